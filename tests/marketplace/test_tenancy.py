"""Tenants are sealed: another tenant's ids answer 404 on every surface that has them."""

import uuid

import pytest
from django.test import Client

from marketplace.choices import Role
from marketplace.selectors.tenancy import api_key_list
from marketplace.services.tenancy.api_keys import api_key_create
from marketplace.services.tenancy.members import membership_set
from marketplace.tenant_context import TenantContext
from tests.factories import PASSWORD, make_tenant, make_user

pytestmark = pytest.mark.django_db


def test_another_tenants_key_id_is_404_in_the_api(tenant, other_tenant, client_for):
    theirs, _ = api_key_create(tenant=other_tenant, name="theirs")
    client = client_for(tenant)
    assert client.get(f"/api/v1/api-keys/{theirs.id}/").status_code == 404
    response = client.post(f"/api/v1/api-keys/{theirs.id}/revoke/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    listed = {k["id"] for k in client.get("/api/v1/api-keys/").json()["results"]}
    assert str(theirs.id) not in listed


@pytest.mark.parametrize("bad_id", ["123", "not-a-uuid", str(uuid.uuid4())])
def test_unknown_or_malformed_ids_are_404_not_500(tenant, client_for, bad_id):
    response = client_for(tenant).get(f"/api/v1/api-keys/{bad_id}/")
    assert response.status_code == 404
    assert response.json()["error"]["message"]


def test_another_tenants_key_is_404_in_the_portal(tenant, other_tenant):
    theirs, _ = api_key_create(tenant=other_tenant, name="theirs")
    browser = Client()
    assert browser.login(username=tenant.user.email, password=PASSWORD)
    response = browser.post(f"/api-keys/{theirs.id}/revoke/")
    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert "theirs" not in browser.get("/api-keys/").content.decode()


def test_members_see_their_own_keys_admins_see_all():
    admin = make_tenant(role=Role.ADMIN)

    member_user = make_user()
    membership_set(organization=admin.organization, user=member_user, role=Role.MEMBER)
    member = TenantContext(organization=admin.organization, user=member_user, role=Role.MEMBER)
    api_key_create(tenant=admin, name="admin's")
    api_key_create(tenant=member, name="member's")
    assert {k.name for k in api_key_list(tenant=admin)} == {"admin's", "member's"}
    assert {k.name for k in api_key_list(tenant=member)} == {"member's"}


def test_a_session_cannot_switch_into_an_organization_it_is_not_in(tenant, other_tenant):
    browser = Client()
    browser.login(username=tenant.user.email, password=PASSWORD)
    browser.post("/organization/", {"organization": str(other_tenant.organization.id)})
    assert browser.session.get("organization_id") != str(other_tenant.organization.id)
    page = browser.get("/api-keys/").content.decode()
    assert other_tenant.organization.name not in page


def test_a_user_in_two_organizations_switches_between_them():
    first = make_tenant("First Org", role=Role.MEMBER)

    second = make_tenant("Second Org", role=Role.OWNER)
    membership_set(organization=second.organization, user=first.user, role=Role.VIEWER)
    browser = Client()
    browser.login(username=first.user.email, password=PASSWORD)
    assert browser.get("/api/v1/me/").json()["organization"]["slug"] in {"first-org", "second-org"}
    browser.post("/organization/", {"organization": str(second.organization.id)})
    me = browser.get("/api/v1/me/").json()
    assert me["organization"]["slug"] == "second-org" and me["role"] == "viewer"
    browser.post("/organization/", {"organization": str(first.organization.id)})
    assert browser.get("/api/v1/me/").json()["organization"]["slug"] == "first-org"


def test_a_user_without_an_organization_is_told_so():
    lonely = make_user()
    browser = Client()
    browser.login(username=lonely.email, password=PASSWORD)
    response = browser.get("/catalog/")
    assert response.status_code == 403 and b"No organization" in response.content
    api = browser.get("/api/v1/me/")
    assert api.status_code == 403 and api.json()["error"]["code"] == "no_organization"
