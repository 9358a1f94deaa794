import pytest
from django.test import Client
from rest_framework.test import APIClient

from marketplace.choices import Role
from marketplace.services.tenancy.api_keys import api_key_create
from tests.factories import PASSWORD, make_tenant, make_user


@pytest.fixture
def api_client():
    return APIClient()


@pytest.fixture
def tenant(db):
    """A member of a fresh organization."""
    return make_tenant(role=Role.MEMBER)


@pytest.fixture
def other_tenant(db):
    return make_tenant(role=Role.OWNER)


def key_client(tenant, role: str | None = None) -> APIClient:
    """An API client authenticated with a new key of ``tenant``."""
    _key, plaintext = api_key_create(tenant=tenant, name="test key", role=role)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    return client


@pytest.fixture
def client_for():
    return key_client


@pytest.fixture
def operator_client(db) -> Client:
    """A browser signed in as an operator (a superuser); ``.user`` is that operator."""
    operator = make_user("ops@example.com", is_superuser=True)
    client = Client()
    assert client.login(username=operator.email, password=PASSWORD)
    client.user = operator
    return client
