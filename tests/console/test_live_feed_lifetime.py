"""Browsers' live feeds end with what opened them (sign-out, removal from the organization) and open
only from the console's own origins. Real Channels: the ASGI routes of console.routing, the Redis
channel layer, sessions in PostgreSQL."""

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import Client

from console.kernel.consumers import CLOSE_ENDED
from console.kernel.events import tenant_group
from console.routing import websocket_urlpatterns
from marketplace.choices import Role
from marketplace.models import Membership
from marketplace.selectors.tenancy import tenant_context_for_user
from marketplace.services.tenancy.api_keys import api_key_create
from marketplace.services.tenancy.members import membership_set
from tests.factories import PASSWORD, make_tenant
from tests.provisioning.test_telemetry import CONNECT_TIMEOUT, accepted, refusal

pytestmark = pytest.mark.django_db(transaction=True)
db = database_sync_to_async
SETTLE = 0.5  # how long "nothing more arrives" is watched for; never a timing assertion


def signed_in(user) -> Client:
    client = Client()
    assert client.login(username=user.email, password=PASSWORD)
    return client


def socket(path: str, *, client: Client | None = None, host="testserver", origin="http://testserver", headers=()):
    sent = [(b"host", host.encode()), (b"origin", origin.encode()), *headers]
    if client is not None:
        sent.append((b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()))
    return WebsocketCommunicator(URLRouter(websocket_urlpatterns), path, headers=sent)


async def tenant_event(organization_id, n: int) -> None:
    await get_channel_layer().group_send(
        tenant_group(organization_id), {"type": "event.message", "event": "balance.changed", "data": {"n": n}}
    )


async def closed_with(ws) -> int:
    """The close code of an open feed, ended by the server (an event frame first would fail here)."""
    output = await ws.receive_output(CONNECT_TIMEOUT)
    assert output["type"] == "websocket.close", f"got {output} before the close"
    return output["code"]


async def receives_event(ws, n: int) -> bool:
    return f'"n": {n}' in await ws.receive_from(CONNECT_TIMEOUT)


def test_signing_out_closes_that_sessions_feeds_and_no_tenant_event_follows(tenant):
    organization = tenant.organization.pk
    leaving, staying = signed_in(tenant.user), signed_in(tenant.user)  # one user, two browsers

    async def scenario():
        gone, kept = socket("/ws/tenant/", client=leaving), socket("/ws/tenant/", client=staying)
        await accepted(gone)
        await accepted(kept)
        response = await db(leaving.post)("/logout/")
        assert response.status_code == 302
        code = await closed_with(gone)
        await tenant_event(organization, 1)
        after_close = await gone.receive_nothing(timeout=SETTLE)
        other_browser_still_live = await receives_event(kept, 1)
        again = socket("/ws/tenant/", client=leaving)  # the signed-out cookie
        refused = await refusal(again)
        for ws in (gone, kept, again):
            await ws.disconnect()
        return code, after_close, other_browser_still_live, refused

    code, nothing_after_close, other_browser_still_live, refused = async_to_sync(scenario)()
    assert code == CLOSE_ENDED and nothing_after_close
    assert other_browser_still_live
    assert refused == 4403


def test_removing_a_member_in_the_admin_closes_their_feeds_and_a_reconnect_is_refused(tenant, operator_client):
    organization = tenant.organization.pk
    owner = Membership.objects.get(organization=organization, role=Role.OWNER).user
    removed, colleague = signed_in(tenant.user), signed_in(owner)
    membership = Membership.objects.get(organization=organization, user=tenant.user)

    async def scenario():
        gone, kept = socket("/ws/tenant/", client=removed), socket("/ws/tenant/", client=colleague)
        await accepted(gone)
        await accepted(kept)
        response = await db(operator_client.post)(
            f"/admin/marketplace/membership/{membership.pk}/delete/", {"post": "yes"}
        )
        assert response.status_code == 302
        code = await closed_with(gone)
        await tenant_event(organization, 2)
        after_close = await gone.receive_nothing(timeout=SETTLE)
        colleague_still_live = await receives_event(kept, 2)
        again = socket("/ws/tenant/", client=removed)  # still signed in, no longer a member
        refused = await refusal(again)
        for ws in (gone, kept, again):
            await ws.disconnect()
        return code, after_close, colleague_still_live, refused

    code, nothing_after_close, colleague_still_live, refused = async_to_sync(scenario)()
    assert not Membership.objects.filter(pk=membership.pk).exists()
    assert code == CLOSE_ENDED and nothing_after_close
    assert colleague_still_live
    assert refused == 4403


def test_a_feed_rechecks_its_membership_before_forwarding_when_no_close_was_announced(tenant, settings):
    settings.FEED_RECHECK_SECONDS = 0  # every message re-checks
    organization = tenant.organization.pk
    browser = signed_in(tenant.user)

    async def scenario():
        ws = socket("/ws/tenant/", client=browser)
        await accepted(ws)
        await tenant_event(organization, 3)
        while_member = await receives_event(ws, 3)
        # Gone without the service (a cascade, a lost close): nothing announced it.
        await db(lambda: Membership.objects.filter(organization=organization, user=tenant.user).delete())()
        await tenant_event(organization, 4)
        code = await closed_with(ws)
        await ws.disconnect()
        return while_member, code

    while_member, code = async_to_sync(scenario)()
    assert while_member and code == CLOSE_ENDED


def test_switching_organization_in_another_tab_does_not_end_a_feed_of_the_first(tenant, settings):
    settings.FEED_RECHECK_SECONDS = 0
    second = make_tenant(role=Role.OWNER).organization
    membership_set(organization=second, user=tenant.user, role=Role.MEMBER)
    first = tenant_context_for_user(user=tenant.user).organization  # what a fresh session follows
    other = second if first.pk != second.pk else tenant.organization
    browser = signed_in(tenant.user)

    async def scenario():
        ws = socket("/ws/tenant/", client=browser)
        await accepted(ws)
        switched = await db(browser.post)("/organization/", {"organization": str(other.pk)})
        assert switched.status_code == 302
        await tenant_event(first.pk, 5)
        still_live = await receives_event(ws, 5)
        await ws.disconnect()
        return still_live

    assert async_to_sync(scenario)()


def test_a_socket_presenting_only_an_api_key_is_refused(tenant):
    """Browser feeds are session-only: a key cannot open one, so none outlives a revoked key."""
    _key, plaintext = api_key_create(tenant=tenant, name="ci")

    async def scenario():
        ws = socket("/ws/tenant/", headers=[(b"authorization", f"Bearer {plaintext}".encode())])
        code = await refusal(ws)
        await ws.disconnect()
        return code

    assert async_to_sync(scenario)() == 4403


@pytest.mark.parametrize(
    ("host", "origin", "trusted", "opens"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000", [], True),
        ("127.0.0.1:8000", "http://127.0.0.1:9999", [], False),  # another port of the same host
        ("127.0.0.1:8000", "https://127.0.0.1:8000", [], False),  # another scheme
        ("127.0.0.1:8000", "http://localhost:8000", [], False),  # another host, though allowed
        ("evil.example:8000", "http://evil.example:8000", [], False),  # a Host outside ALLOWED_HOSTS
        ("127.0.0.1:8000", "https://console.example.com", ["https://console.example.com"], True),
        ("127.0.0.1:8000", "https://eu.console.example.com", ["https://*.console.example.com"], True),
        ("127.0.0.1:8000", "http://eu.console.example.com", ["https://*.console.example.com"], False),
        ("127.0.0.1:8000", "null", [], False),
    ],
)
def test_a_browser_socket_opens_only_from_the_consoles_own_origins(tenant, settings, host, origin, trusted, opens):
    settings.CSRF_TRUSTED_ORIGINS = trusted
    browser = signed_in(tenant.user)

    async def scenario():
        ws = socket("/ws/tenant/", client=browser, host=host, origin=origin)
        connected, _code = await ws.connect(timeout=CONNECT_TIMEOUT)
        await ws.disconnect()
        return connected

    assert async_to_sync(scenario)() is opens


def test_a_browser_socket_without_an_origin_is_refused(tenant):
    browser = signed_in(tenant.user)

    async def scenario():
        ws = WebsocketCommunicator(
            URLRouter(websocket_urlpatterns),
            "/ws/tenant/",
            headers=[(b"host", b"testserver"), (b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())],
        )
        connected, _code = await ws.connect(timeout=CONNECT_TIMEOUT)
        await ws.disconnect()
        return connected

    assert async_to_sync(scenario)() is False


def test_removing_a_member_from_the_organizations_admin_page_closes_their_feed(tenant, operator_client):
    organization = tenant.organization
    memberships = list(Membership.objects.filter(organization=organization).order_by("pk"))
    data = {"name": organization.name, "slug": organization.slug}
    for inline in ("api_keys", "quotas"):
        data.update({f"{inline}-TOTAL_FORMS": "0", f"{inline}-INITIAL_FORMS": "0"})
    data.update({"memberships-TOTAL_FORMS": len(memberships), "memberships-INITIAL_FORMS": len(memberships)})
    for n, membership in enumerate(memberships):
        row = {"id": membership.pk, "organization": organization.pk, "user": membership.user_id}
        row["role"] = membership.role
        if membership.user_id == tenant.user.pk:
            row["DELETE"] = "on"
        data.update({f"memberships-{n}-{field}": value for field, value in row.items()})
    browser = signed_in(tenant.user)

    async def scenario():
        ws = socket("/ws/tenant/", client=browser)
        await accepted(ws)
        response = await db(operator_client.post)(f"/admin/marketplace/organization/{organization.pk}/change/", data)
        assert response.status_code == 302
        code = await closed_with(ws)
        await ws.disconnect()
        return code

    assert async_to_sync(scenario)() == CLOSE_ENDED
    assert not Membership.objects.filter(organization=organization, user=tenant.user).exists()
    assert Membership.objects.filter(organization=organization).count() == len(memberships) - 1
