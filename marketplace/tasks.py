"""Celery tasks of the marketplace. Thin: take ids or nothing, call one service; safe to run twice."""

from celery import shared_task

from marketplace.services.billing.invoicing import cost_tick
from marketplace.services.billing.invoicing import invoices_close as close
from marketplace.services.billing.metering import usage_rate as rate
from marketplace.services.billing.pricing import prices_apply as apply
from marketplace.services.endpoints.autoscaling import endpoints_autoscale as autoscale_endpoints
from marketplace.services.endpoints.lifecycle import endpoint_reconcile as reconcile_endpoint
from marketplace.services.endpoints.lifecycle import endpoints_reconcile as reconcile_endpoints
from marketplace.services.endpoints.traffic import traffic_collect as collect_traffic
from marketplace.services.idempotency import idempotency_records_expire as expire_records
from marketplace.services.reservations.enforcement import balances_enforce
from marketplace.services.reservations.lifecycle import reservation_begin, reservations_advance
from marketplace.services.reservations.provisioning import (
    reservation_provision_start,
    reservation_teardown_start,
)
from marketplace.services.reservations.provisioning import (
    reservations_reconcile as reconcile,
)


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


# Billing (marketplace.services.billing.metering, spend, invoicing, pricing), on the "billing" queue.


@shared_task(acks_late=True, ignore_result=True)
def usage_rate() -> dict[str, int]:
    """Rate every active reservation up to now, then release what overstayed an empty balance."""
    return {**rate(), **balances_enforce()}


@shared_task(acks_late=True, ignore_result=True)
def rate_reservation(reservation_id: str) -> dict[str, int]:
    return rate(reservation_ids=[reservation_id])


@shared_task(ignore_result=True)
def billing_tick() -> int:
    return cost_tick()


@shared_task(acks_late=True, ignore_result=True)
def invoices_close() -> int:
    return close()


@shared_task(ignore_result=True)
def prices_apply() -> int:
    return apply()


# Inference endpoints (marketplace.services.endpoints).


@shared_task(acks_late=True, ignore_result=True)
def endpoints_reconcile() -> int:
    return reconcile_endpoints()


@shared_task(acks_late=True, ignore_result=True)
def endpoint_reconcile(endpoint_id: str) -> dict[str, int]:
    return reconcile_endpoint(endpoint_id=endpoint_id)


@shared_task(ignore_result=True)
def traffic_collect() -> int:
    """The gateways' request counts, Redis to EndpointTraffic (exactly once per batch)."""
    return collect_traffic()


@shared_task(ignore_result=True)
def endpoints_autoscale() -> int:
    """Every live endpoint's replicas asked for from the requests in flight the gateways saw."""
    return autoscale_endpoints()
