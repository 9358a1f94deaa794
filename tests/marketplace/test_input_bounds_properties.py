"""Every endpoint that takes a date, a duration or a term, given any of them: the calendar's edges
(year 1 and 9999, with microseconds and any UTC offset), moments near now, huge, negative, tiny or
malformed numbers of hours, terms that exist and terms that do not. Shown by properties: nothing is
a server error, a 400 names the field at fault, and a refusal writes nothing.

Each example runs in a savepoint rolled back after it (as in test_billing_properties), through the
real API and portal views on PostgreSQL."""

from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.db import transaction
from django.test import Client
from django.utils import timezone as django_timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketplace.models import Allocation, LedgerEntry, Reservation
from marketplace.services.reservations.lifecycle import reservation_create
from tests.conftest import key_client
from tests.factories import PASSWORD, make_offer_with_nodes, make_tenant

pytestmark = pytest.mark.django_db

SETTINGS = {
    "deadline": None,
    "database": None,
    "derandomize": True,  # the same examples every run: a failure is a finding, not a flake
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}
EXAMPLES = 60

# --- Inputs ------------------------------------------------------------------------------------

offsets = st.one_of(
    st.just(UTC),
    st.builds(
        lambda minutes: timezone(timedelta(minutes=minutes)),
        st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
    ),
)
calendar = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999))
EDGES = [
    "9999-12-31T23:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59.999999-23:59",
    "9999-12-31T22:00:00-01:00",
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T00:00:00.000001-00:30",
    "2031-02-30T00:00:00Z",
    "soon",
    "",
]


@st.composite
def moments(draw) -> str:
    """A date-time as a client sends it: an edge of the calendar, anywhere in it, or near now."""
    kind = draw(st.sampled_from(["edge", "calendar", "near", "near"]))
    if kind == "edge":
        return draw(st.sampled_from(EDGES))
    if kind == "calendar":
        return draw(calendar).replace(tzinfo=draw(offsets)).isoformat()
    ahead = timedelta(minutes=draw(st.integers(min_value=-600, max_value=600 * 24 * 60)))
    return (django_timezone.now() + ahead).astimezone(draw(offsets)).isoformat()


hours = st.one_of(
    st.sampled_from(["1e999999", "-1e999999", "1e-999999", "NaN", "Infinity", "-0", "0", "0.0001", "0.02", "1.5"]),
    st.sampled_from(["47", "2160", "2161", "43920", "43921", "99999999", "1" * 40, "one", "1,5", " 2 "]),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(min_value=0.01, max_value=5000),
)
terms = st.sampled_from([1, 3, 6, 12, 0, -1, 2, 10**12, "1", "month"])


def optional(strategy):
    return st.one_of(st.none(), strategy)


def body_of(**fields) -> dict:
    return {name: value for name, value in fields.items() if value is not None}


# --- What must hold ------------------------------------------------------------------------------


def rows() -> tuple[int, int, int]:
    return Reservation.objects.count(), Allocation.objects.count(), LedgerEntry.objects.count()


@contextmanager
def rolled_back():
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def assert_answered(response, named: set[str], *, ok: tuple[int, ...], before: tuple[int, int, int]):
    """No 5xx; a 400 names fields, among ``named`` (those sent, or the one missing); a refusal wrote
    nothing."""
    assert response.status_code < 500, response.content[:500]
    assert response.status_code in (*ok, 400, 402, 409, 422), response.content[:500]
    if response.status_code >= 400:
        assert rows() == before, response.content[:500]
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["fields"] and set(error["fields"]) <= named, error
        assert "digits" not in error["message"], error


@pytest.fixture
def world(db):
    offer = make_offer_with_nodes(nodes=3, term_discounts={1: "10", 3: "20"})
    tenant = make_tenant()
    end = django_timezone.now() + timedelta(hours=2)
    reservation = reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=end)
    return {"offer": offer, "tenant": tenant, "reservation": reservation, "api": key_client(tenant)}


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(start=optional(moments()), end=optional(moments()), duration=optional(hours), term=optional(terms))
def test_create_answers_any_dates_durations_and_terms(world, start, end, duration, term):
    body = body_of(offer=world["offer"].id, start=start, end=end, duration_hours=duration, term_months=term)
    with rolled_back():
        before = rows()
        response = world["api"].post("/api/v1/reservations/", body, format="json")
        # Without an end, a duration or a term, the refusal names end (what is missing).
        missing = set() if {"end", "duration_hours", "term_months"} & set(body) else {"end"}
        assert_answered(response, set(body) | missing, ok=(201,), before=before)


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(end=optional(moments()), duration=optional(hours))
def test_extend_answers_any_end_or_duration(world, end, duration):
    body = body_of(end=end, duration_hours=duration)
    path = f"/api/v1/reservations/{world['reservation'].pk}/extend/"
    with rolled_back():
        before = rows()
        response = world["api"].post(path, body, format="json")
        assert_answered(response, set(body) or {"end"}, ok=(200,), before=before)
        if response.status_code != 200:
            assert Reservation.objects.get(pk=world["reservation"].pk).end == world["reservation"].end


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(start=optional(moments()), end=optional(moments()))
def test_the_calendar_and_usage_answer_any_window(world, start, end):
    query = body_of(start=start, end=end)
    with rolled_back():
        before = rows()
        for path in [f"/api/v1/offers/{world['offer'].id}/availability/", "/api/v1/usage/"]:
            response = world["api"].get(path, query)
            assert_answered(response, set(query), ok=(200,), before=before)


portal_moments = st.one_of(
    st.sampled_from(["9999-12-31T23:00", "9999-12-31T23:59:59", "0001-01-01T00:00", "0001-01-01 00:00", "soon", ""]),
    calendar.map(lambda moment: moment.strftime("%Y-%m-%dT%H:%M")),
    st.integers(min_value=-600, max_value=400 * 24 * 60).map(
        lambda minutes: (django_timezone.now() + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M")
    ),
)


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(start=portal_moments, duration=optional(hours), term=optional(terms), confirm=st.booleans())
def test_the_portal_reserve_form_answers_any_dates_durations_and_terms(world, start, duration, term, confirm):
    browser = Client()
    assert browser.login(username=world["tenant"].user.email, password=PASSWORD)
    form = body_of(quantity=1, start=start, duration_hours=duration, term_months=term, confirm="1" if confirm else None)
    with rolled_back():
        before = rows()
        response = browser.post(f"/offers/{world['offer'].id}/reserve/", form)
        assert response.status_code in (200, 302, 400, 402, 409), response.content[:500]
        if response.status_code != 302:
            assert rows() == before
        if response.status_code == 400:
            errors = response.context["form"].errors
            assert errors and "__all__" not in errors, errors
            assert set(errors) <= {"start", "duration_hours", "term_months", "quantity"}, errors
            assert "digits" not in response.content.decode()


def test_the_edges_the_issue_names_are_400_on_their_field(world):
    """The exact requests of the report, as examples (hypothesis finds them, this names them)."""
    api, offer = world["api"], world["offer"]
    edge = "9999-12-31T23:00:00Z"
    for body in [
        {"offer": offer.id, "start": edge, "duration_hours": 1},
        {"offer": offer.id, "start": edge, "term_months": 1},
        {"offer": offer.id, "start": edge, "end": "9999-12-31T23:59:00Z"},
    ]:
        response = api.post("/api/v1/reservations/", body, format="json")
        assert response.status_code == 400 and list(response.json()["error"]["fields"]) == ["start"], body
    response = api.get(f"/api/v1/offers/{offer.id}/availability/", {"start": edge})
    assert response.status_code == 400 and list(response.json()["error"]["fields"]) == ["start"]
    assert Reservation.objects.count() == 1
