"""Celery tasks of the marketplace. Thin: take ids or nothing, call one service; safe to run twice."""

from celery import shared_task

from marketplace.services.idempotency import idempotency_records_expire as expire_records
from marketplace.services.reservations import reservations_advance


@shared_task(acks_late=True, ignore_result=True)
def reservations_tick() -> dict[str, int]:
    return reservations_advance()


@shared_task(ignore_result=True)
def idempotency_records_expire() -> int:
    return expire_records()
