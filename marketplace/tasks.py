"""Celery tasks of the marketplace. Thin: take ids or nothing, call one service; safe to run twice."""

from celery import shared_task

from marketplace.services.idempotency import idempotency_records_expire as expire_records
from marketplace.services.provisioning_flow import (
    reservation_provision_start,
    reservation_teardown_start,
)
from marketplace.services.provisioning_flow import (
    reservations_reconcile as reconcile,
)
from marketplace.services.reservations import reservation_begin, reservations_advance


@shared_task(acks_late=True, ignore_result=True)
def reservations_tick() -> dict[str, int]:
    return reservations_advance()


@shared_task(acks_late=True, ignore_result=True)
def begin_reservation(reservation_id: str) -> bool:
    return reservation_begin(reservation_id=reservation_id)  # no-op unless pending and due


@shared_task(acks_late=True, ignore_result=True)
def provision_reservation(reservation_id: str) -> int:
    return reservation_provision_start(reservation_id=reservation_id)  # no-op once every command exists


@shared_task(acks_late=True, ignore_result=True)
def release_reservation(reservation_id: str) -> int:
    return reservation_teardown_start(reservation_id=reservation_id)


@shared_task(acks_late=True, ignore_result=True)
def reservations_reconcile() -> dict[str, int]:
    return reconcile()


@shared_task(ignore_result=True)
def idempotency_records_expire() -> int:
    return expire_records()
