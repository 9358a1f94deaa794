import hashlib
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from console.kernel.errors import DomainError, Forbidden
from marketplace.choices import Role
from marketplace.models import ApiKey
from marketplace.services.tenancy.api_keys import (
    InvalidApiKey,
    api_key_authenticate,
    api_key_create,
    api_key_revoke,
    api_keys_revoke_as_operator,
)
from marketplace.services.tenancy.members import membership_set
from marketplace.tenant_context import TenantContext
from tests.factories import PASSWORD, make_tenant, make_user

pytestmark = pytest.mark.django_db


def bearer(plaintext: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


def test_a_key_is_stored_only_as_a_digest_behind_a_visible_prefix(tenant):
    key, plaintext = api_key_create(tenant=tenant, name="ci")
    scheme, prefix, secret = plaintext.split("_", 2)
    assert scheme == "nck" and prefix == key.prefix and len(secret) >= 40
    row = ApiKey.objects.get(pk=key.pk)
    assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    stored = " ".join(str(value) for value in ApiKey.objects.filter(pk=key.pk).values().first().values())
    assert secret not in stored and plaintext not in stored


def test_the_key_authenticates_and_a_tampered_one_does_not(tenant):
    key, plaintext = api_key_create(tenant=tenant, name="ci")
    assert api_key_authenticate(raw_key=plaintext).pk == key.pk
    for bad in [
        plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B"),
        f"nck_{key.prefix}_",
        "nck__x",
        "garbage",
        "",
        f"xyz_{key.prefix}_{plaintext.split('_', 2)[2]}",
    ]:
        with pytest.raises(InvalidApiKey):
            api_key_authenticate(raw_key=bad)


def test_last_used_is_recorded(tenant):
    key, plaintext = api_key_create(tenant=tenant, name="ci")
    assert key.last_used_at is None
    assert bearer(plaintext).get("/api/v1/me/").status_code == 200
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_an_expired_key_is_refused_with_401(tenant):
    key, plaintext = api_key_create(tenant=tenant, name="short", expires_at=timezone.now() + timedelta(hours=1))
    assert bearer(plaintext).get("/api/v1/me/").status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = bearer(plaintext).get("/api/v1/me/")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_an_expiry_in_the_past_is_refused_at_creation(tenant):
    with pytest.raises(DomainError, match="future"):
        api_key_create(tenant=tenant, name="x", expires_at=timezone.now() - timedelta(minutes=1))
    assert not ApiKey.objects.exists()


def test_a_revoked_key_is_refused_at_once(tenant):
    key, plaintext = api_key_create(tenant=tenant, name="leaked")
    client = bearer(plaintext)
    assert client.get("/api/v1/offers/").status_code == 200
    api_key_revoke(tenant=tenant, key=key)
    assert client.get("/api/v1/offers/").status_code == 401
    key.refresh_from_db()
    assert key.status == "revoked"


def test_a_key_of_a_member_who_left_stops_working():
    tenant = make_tenant(role=Role.ADMIN)
    _key, plaintext = api_key_create(tenant=tenant, name="ci")
    assert bearer(plaintext).get("/api/v1/me/").status_code == 200
    tenant.organization.memberships.filter(user=tenant.user).delete()
    assert bearer(plaintext).get("/api/v1/me/").status_code == 403


def test_a_key_acts_with_the_weaker_of_its_role_and_its_creators_current_role():
    tenant = make_tenant(role=Role.ADMIN)
    _key, plaintext = api_key_create(tenant=tenant, name="ops", role=Role.ADMIN)
    assert bearer(plaintext).get("/api/v1/me/").json()["role"] == "admin"
    membership_set(organization=tenant.organization, user=tenant.user, role=Role.VIEWER)
    assert bearer(plaintext).get("/api/v1/me/").json()["role"] == "viewer"


def test_nobody_creates_a_key_stronger_than_themselves():
    viewer = make_tenant(role=Role.VIEWER)
    with pytest.raises(Forbidden):
        api_key_create(tenant=viewer, name="x", role=Role.MEMBER)
    key, _ = api_key_create(tenant=viewer, name="read-only")
    assert key.role == Role.VIEWER


def test_members_revoke_only_their_own_keys_admins_any():
    member = make_tenant(role=Role.MEMBER)
    colleague = make_user()
    membership_set(organization=member.organization, user=colleague, role=Role.MEMBER)

    colleague_ctx = TenantContext(organization=member.organization, user=colleague, role=Role.MEMBER)
    their_key, _ = api_key_create(tenant=colleague_ctx, name="theirs")
    with pytest.raises(Forbidden):
        api_key_revoke(tenant=member, key=their_key)
    admin = make_user()
    membership_set(organization=member.organization, user=admin, role=Role.ADMIN)
    admin_ctx = TenantContext(organization=member.organization, user=admin, role=Role.ADMIN)
    assert api_key_revoke(tenant=admin_ctx, key=their_key).status == "revoked"


class TestApiKeysEndpoint:
    def test_create_shows_the_key_once_and_list_never_does(self, tenant, client_for):
        client = client_for(tenant)
        created = client.post("/api/v1/api-keys/", {"name": "deploy bot", "role": "viewer"}, format="json")
        assert created.status_code == 201, created.content
        body = created.json()
        assert body["key"].startswith(f"nck_{body['prefix']}_") and body["role"] == "viewer"
        listed = client.get("/api/v1/api-keys/").json()["results"]
        assert {k["name"] for k in listed} == {"test key", "deploy bot"}
        assert all("key" not in k and "secret_hash" not in k for k in listed)
        assert client.get(f"/api/v1/api-keys/{body['id']}/").json()["prefix"] == body["prefix"]
        # the new key works
        assert bearer(body["key"]).get("/api/v1/me/").json()["api_key_prefix"] == body["prefix"]

    def test_revoke_through_the_api(self, tenant, client_for):
        client = client_for(tenant)
        body = client.post("/api/v1/api-keys/", {"name": "temp"}, format="json").json()
        revoked = client.post(f"/api/v1/api-keys/{body['id']}/revoke/")
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        assert bearer(body["key"]).get("/api/v1/me/").status_code == 401

    @pytest.mark.parametrize(
        "payload,field",
        [
            ({}, "name"),
            ({"name": ""}, "name"),
            ({"name": "x", "role": "emperor"}, "role"),
            ({"name": "x", "expires_at": "not a date"}, "expires_at"),
            ({"name": "x" * 101}, "name"),
        ],
    )
    def test_bad_input_is_a_400_with_a_message_and_writes_nothing(self, tenant, client_for, payload, field):
        client = client_for(tenant)
        before = ApiKey.objects.count()
        response = client.post("/api/v1/api-keys/", payload, format="json")
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "validation_error" and field in error["fields"] and error["message"]
        assert ApiKey.objects.count() == before

    def test_a_viewer_asking_for_a_member_key_gets_403(self, client_for):
        viewer = make_tenant(role=Role.VIEWER)
        response = client_for(viewer).post("/api/v1/api-keys/", {"name": "x", "role": "member"}, format="json")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "permission_denied"

    def test_malformed_json_is_a_400(self, tenant, client_for):
        response = client_for(tenant).post("/api/v1/api-keys/", "{not json", content_type="application/json")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "parse_error"


class TestKeysMadeWithKeys:
    """A credential never outlives or outranks the one that made it (ARCHITECTURE invariant 5)."""

    def made_with(self, client: APIClient, **payload) -> dict:
        response = client.post("/api/v1/api-keys/", {"name": "child", **payload}, format="json")
        assert response.status_code == 201, response.content
        return response.json()

    def test_a_key_made_with_a_short_lived_key_expires_with_it(self, tenant):
        parent, plaintext = api_key_create(tenant=tenant, name="short", expires_at=timezone.now() + timedelta(hours=1))
        child = self.made_with(bearer(plaintext))
        assert child["expires_at"] is not None
        assert ApiKey.objects.get(pk=child["id"]).expires_at == parent.expires_at
        assert ApiKey.objects.get(pk=child["id"]).parent_id == parent.pk
        sooner = self.made_with(bearer(plaintext), expires_at=(timezone.now() + timedelta(minutes=5)).isoformat())
        assert ApiKey.objects.get(pk=sooner["id"]).expires_at < parent.expires_at

    def test_a_later_expiry_than_the_parents_is_refused_and_nothing_is_made(self, tenant):
        _parent, plaintext = api_key_create(tenant=tenant, name="short", expires_at=timezone.now() + timedelta(hours=1))
        before = ApiKey.objects.count()
        later = (timezone.now() + timedelta(days=30)).isoformat()
        response = bearer(plaintext).post("/api/v1/api-keys/", {"name": "x", "expires_at": later}, format="json")
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "outlives_parent" and "expires_at" in error["fields"] and "outlive" in error["message"]
        assert ApiKey.objects.count() == before

    def test_revoking_a_key_revokes_every_key_made_with_it(self, tenant):
        parent, plaintext = api_key_create(tenant=tenant, name="parent")
        child = self.made_with(bearer(plaintext))
        grandchild = self.made_with(bearer(child["key"]))
        unrelated, unrelated_plaintext = api_key_create(tenant=tenant, name="made by the person")
        for key in (plaintext, child["key"], grandchild["key"], unrelated_plaintext):
            assert bearer(key).get("/api/v1/me/").status_code == 200
        api_key_revoke(tenant=tenant, key=parent)
        for key in (plaintext, child["key"], grandchild["key"]):
            assert bearer(key).get("/api/v1/me/").status_code == 401
        assert bearer(unrelated_plaintext).get("/api/v1/me/").status_code == 200
        assert ApiKey.objects.get(pk=grandchild["id"]).status == "revoked"

    def test_an_operator_revoking_a_leaked_key_revokes_its_descendants(self, tenant):
        parent, plaintext = api_key_create(tenant=tenant, name="leaked")
        child = self.made_with(bearer(plaintext))
        assert api_keys_revoke_as_operator(keys=ApiKey.objects.filter(pk=parent.pk), actor="ops@example.com") == 2
        assert bearer(child["key"]).get("/api/v1/me/").status_code == 401

    def test_a_key_made_with_a_viewer_key_cannot_be_stronger(self):
        admin = make_tenant(role=Role.ADMIN)
        _key, plaintext = api_key_create(tenant=admin, name="read-only", role=Role.VIEWER)
        response = bearer(plaintext).post("/api/v1/api-keys/", {"name": "x", "role": "admin"}, format="json")
        assert response.status_code == 403
        child = self.made_with(bearer(plaintext))
        assert child["role"] == "viewer"

    def test_a_key_made_by_a_signed_in_person_has_no_parent(self, tenant):
        client = Client()
        assert client.login(username=tenant.user.email, password=PASSWORD)
        response = client.post("/api-keys/", {"name": "from the portal", "role": "member"})
        assert response.status_code == 200
        assert ApiKey.objects.get(name="from the portal").parent_id is None
