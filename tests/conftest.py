import pytest
from django.test import Client
from rest_framework.test import APIClient

from marketplace.choices import Role
from marketplace.services.tenancy.api_keys import api_key_create
from tests.factories import PASSWORD, make_offer_with_nodes, make_tenant, make_user


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


@pytest.fixture
def offer(request, db):
    """A node offer with free 8-GPU nodes of its type at its site (``make_offer_with_nodes``). A module
    or a test says which with ``pytest.mark.offer(price=..., nodes=..., term_discounts=..., <Offer field>=...)``;
    unmarked: $2.49 per GPU-hour, three nodes, no terms."""
    marker = request.node.get_closest_marker("offer")
    return make_offer_with_nodes(**(marker.kwargs if marker else {}))


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
