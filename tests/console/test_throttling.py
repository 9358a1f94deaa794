"""Rate limits (console.kernel.throttling): the API's budgets per key and per user, writes apart from reads
and expensive reads apart from both; failed sign-ins per account and per client address, on the
portal and the admin. Counters in the real Redis cache, each test in a namespace of its own."""

import uuid

import pytest
from django.test import Client, RequestFactory
from rest_framework.exceptions import Throttled
from rest_framework.test import APIClient

from console.kernel.errors import api_exception_handler
from console.kernel.throttling import check_rates, client_address
from marketplace.models import ApiKey
from tests.conftest import key_client
from tests.factories import PASSWORD, make_user


@pytest.fixture(autouse=True)
def fresh_counters(settings):
    """A cache namespace of this test's own: counters of other tests (and runs) do not count here."""
    settings.CACHES = {"default": {**settings.CACHES["default"], "KEY_PREFIX": f"test-{uuid.uuid4().hex}"}}


@pytest.fixture
def rates(settings):
    def set_rates(**rates):
        settings.REST_FRAMEWORK = {
            **settings.REST_FRAMEWORK,
            "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates},
        }

    return set_rates


def assert_throttled(response) -> None:
    assert response.status_code == 429, response.content
    assert set(response.json()) == {"error"}
    assert response.json()["error"]["code"] == "throttled" and response.json()["error"]["message"]
    assert set(response.json()["error"]) == {"code", "message"}
    assert int(response["Retry-After"]) >= 1


def session_client(user) -> APIClient:
    client = APIClient()
    assert client.login(username=user.email, password=PASSWORD)
    return client


def test_each_key_has_its_own_read_budget_and_the_user_another(tenant, rates):
    rates(api_read="3/day")
    first, second, browser = key_client(tenant), key_client(tenant), session_client(tenant.user)
    assert [first.get("/api/v1/me/").status_code for _ in range(3)] == [200, 200, 200]
    assert_throttled(first.get("/api/v1/me/"))
    assert second.get("/api/v1/me/").status_code == 200  # another key of the same user and organization
    assert browser.get("/api/v1/me/").status_code == 200  # the user's own session


def test_a_session_user_has_a_read_budget_that_their_keys_do_not_spend(tenant, rates):
    rates(api_read="2/day")
    browser, key = session_client(tenant.user), key_client(tenant)
    assert [browser.get("/api/v1/balance/").status_code for _ in range(2)] == [200, 200]
    assert_throttled(browser.get("/api/v1/balance/"))
    assert session_client(tenant.user).get("/api/v1/me/").status_code == 429  # the user, whatever the session
    assert key.get("/api/v1/me/").status_code == 200


def test_writes_have_their_own_budget_and_a_refused_write_changes_nothing(tenant, rates):
    rates(api_write="2/day")
    client = key_client(tenant)
    created = [client.post("/api/v1/api-keys/", {"name": f"k{n}"}, format="json").status_code for n in range(2)]
    assert created == [201, 201]
    keys = ApiKey.objects.filter(organization=tenant.organization).count()
    assert_throttled(client.post("/api/v1/api-keys/", {"name": "one too many"}, format="json"))
    assert ApiKey.objects.filter(organization=tenant.organization).count() == keys
    assert client.get("/api/v1/api-keys/").status_code == 200  # reads are another budget


def test_expensive_reads_have_a_budget_apart_from_ordinary_reads(tenant, rates):
    rates(api_expensive="2/day")
    client = key_client(tenant)
    assert client.get("/api/v1/invoices/current/").status_code == 200
    assert client.get("/api/v1/usage/").status_code == 200
    assert_throttled(client.get("/api/v1/invoices/current/"))
    assert_throttled(client.get("/api/v1/usage/"))
    assert client.get("/api/v1/invoices/").status_code == 200
    assert client.get("/api/v1/me/").status_code == 200


def test_limits_can_be_lifted_with_off(tenant, rates):
    rates(api_read="off")
    client = key_client(tenant)
    assert {client.get("/api/v1/me/").status_code for _ in range(5)} == {200}


def test_a_mistyped_rate_fails_the_system_check(rates):
    rates(api_write="100/fortnight")
    assert [error.id for error in check_rates()] == ["console.E001"]


# --- Sign-in ---------------------------------------------------------------------------------------


def sign_in(path: str, email: str, password: str, address: str):
    return Client().post(path, {"username": email, "password": password}, REMOTE_ADDR=address)


def assert_signin_throttled(response) -> None:
    assert response.status_code == 429
    assert b"Too many failed sign-ins" in response.content
    assert int(response["Retry-After"]) >= 1
    assert "sessionid" not in response.cookies


def test_failed_sign_ins_of_one_account_are_throttled_before_any_password_check(db, settings):
    settings.SIGNIN_FAILURES_PER_ACCOUNT, settings.SIGNIN_FAILURES_PER_ADDRESS = 3, 100
    alice, bob = make_user("alice@example.com"), make_user("bob@example.com")
    for email in ("alice@example.com", "Alice@Example.com", " ALICE@example.com"):  # one account, any case
        assert sign_in("/login/", email, "wrong", "192.0.2.1").status_code == 200
    # The right password now, even from elsewhere: refused without being checked.
    assert_signin_throttled(sign_in("/login/", alice.email, PASSWORD, "198.51.100.9"))
    assert sign_in("/login/", bob.email, PASSWORD, "192.0.2.1").status_code == 302  # the address has tries left


def test_failed_sign_ins_from_one_address_are_throttled_across_accounts(db, settings):
    settings.SIGNIN_FAILURES_PER_ACCOUNT, settings.SIGNIN_FAILURES_PER_ADDRESS = 100, 3
    carol = make_user("carol@example.com")
    for n in range(3):
        assert sign_in("/login/", f"guess{n}@example.com", "wrong", "203.0.113.7").status_code == 200
    assert_signin_throttled(sign_in("/login/", carol.email, PASSWORD, "203.0.113.7"))
    assert sign_in("/login/", carol.email, PASSWORD, "203.0.113.8").status_code == 302


def test_the_admin_sign_in_counts_and_refuses_like_the_portals(db, settings):
    settings.SIGNIN_FAILURES_PER_ACCOUNT = 2
    operator = make_user("ops@example.com", is_superuser=True)
    assert sign_in("/login/", operator.email, "wrong", "192.0.2.5").status_code == 200
    assert sign_in("/admin/login/", operator.email, "wrong", "192.0.2.6").status_code == 200
    assert_signin_throttled(sign_in("/admin/login/", operator.email, PASSWORD, "192.0.2.7"))


def test_a_successful_sign_in_forgives_the_accounts_failures(db, settings):
    settings.SIGNIN_FAILURES_PER_ACCOUNT = 2
    dave = make_user("dave@example.com")
    assert sign_in("/login/", dave.email, "wrong", "192.0.2.9").status_code == 200
    assert sign_in("/login/", dave.email, PASSWORD, "192.0.2.9").status_code == 302
    assert sign_in("/login/", dave.email, "wrong", "192.0.2.9").status_code == 200
    assert sign_in("/login/", dave.email, PASSWORD, "192.0.2.9").status_code == 302


@pytest.mark.parametrize(
    ("proxies", "forwarded", "address"),
    [
        (0, "198.51.100.1", "10.0.0.1"),  # no proxy of ours: the header is the client's to write
        (1, "203.0.113.66, 198.51.100.1", "198.51.100.1"),  # what our proxy saw, not what was claimed
        (2, "203.0.113.66, 198.51.100.1, 10.0.0.2", "198.51.100.1"),
        (1, "", "10.0.0.1"),
    ],
)
def test_the_client_address_believes_only_the_trusted_proxies(settings, proxies, forwarded, address):
    settings.TRUSTED_PROXY_COUNT = proxies
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR=forwarded)
    assert client_address(request) == address


@pytest.mark.parametrize(("wait", "retry_after"), [(None, "1"), (0, "1"), (0.2, "1"), (2.5, "3")])
def test_a_throttled_answer_always_says_when_to_retry_in_whole_seconds(wait, retry_after):
    response = api_exception_handler(Throttled(wait=wait), {})
    assert response.status_code == 429 and response.data["error"]["code"] == "throttled"
    assert response["Retry-After"] == retry_after
