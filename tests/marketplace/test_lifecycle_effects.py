"""What entering a reservation state sets off is declared once, next to the transition table
(models.reservations.RESERVATION_ON_ENTER), and the services carry it out: these tests hold the
table to the lifecycle and to the Celery tasks that really exist."""

from celery import current_app

import marketplace.tasks  # noqa: F401 - registers the tasks, as a worker's autodiscovery does
from marketplace.choices import HOLDING_STATES, SETTLING_STATES, ReservationState
from marketplace.models import RESERVATION_ON_ENTER, RESERVATION_TRANSITIONS
from marketplace.models.reservations import can_end_early

S = ReservationState


def test_every_state_declares_what_entering_it_does():
    assert set(RESERVATION_ON_ENTER) == set(RESERVATION_TRANSITIONS) == set(S.values)


def test_every_task_named_is_a_registered_celery_task():
    named = {task for effects in RESERVATION_ON_ENTER.values() for task in effects.tasks}
    assert named and named <= set(current_app.tasks), named - set(current_app.tasks)


def test_nodes_are_freed_exactly_when_a_reservation_stops_holding_them():
    assert {s for s, effects in RESERVATION_ON_ENTER.items() if effects.frees_nodes} == set(S.values) - HOLDING_STATES


def test_every_state_that_leaves_active_but_completed_rates_the_reservation_to_its_end():
    rating = {s for s, effects in RESERVATION_ON_ENTER.items() if "marketplace.tasks.rate_reservation" in effects.tasks}
    assert rating == set(SETTLING_STATES) - {S.COMPLETED}


def test_cancel_and_extend_follow_the_transition_table():
    assert {s for s in S.values if can_end_early(s)} == {S.PENDING, S.PROVISIONING, S.ACTIVE}
