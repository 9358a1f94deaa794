"""Invoices and the live cost ticker. The only writer of Invoice and InvoiceLine.

A month is invoiced once it has ended (and INVOICE_CLOSE_DELAY_MINUTES passed, so releases near
midnight are rated): every tenant with usage in it gets one finalized invoice, a line per
reservation and one per inference endpoint (all its replicas' slice reservations together), rounded to
cents there and only there. Finalized invoices are immutable (a trigger)."""

import logging
from collections.abc import Callable
from datetime import date, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from console.kernel.events import publish_many, tenant_group
from marketplace.choices import SETTLING_STATES, ReservationState
from marketplace.models import Invoice, InvoiceLine, Organization, Reservation, UsageRecord
from marketplace.money import month_bounds, month_start
from marketplace.selectors.billing import cost_ticks, invoice_lines, invoice_totals
from marketplace.services.billing.metering import usage_rate

logger = logging.getLogger(__name__)
CHUNK = 1000  # tenants per transaction
LOOKBACK_MONTHS = 3
_LOCK_KEY = 0x6E63_696E  # one closing run at a time (pg advisory lock)


def invoices_close(*, now: datetime | None = None, progress: Callable[[int], None] | None = None) -> int:
    """Rate up to now, then finalize every ended month not yet invoiced. Returns invoices written."""
    now = now or timezone.now()
    usage_rate(now=now)
    cutoff = now - timedelta(minutes=settings.INVOICE_CLOSE_DELAY_MINUTES)
    month, written = month_start(cutoff), 0
    months = []
    for _ in range(LOOKBACK_MONTHS):
        month = month_start(month_bounds(month)[0] - timedelta(days=1))
        months.append(month)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [_LOCK_KEY])
        if not cursor.fetchone()[0]:
            logger.info("Another run is closing invoices")
            return 0
        try:
            for month in reversed(months):
                late = _unrated_before(month_bounds(month)[1])
                if late:  # a concurrent run still holds them, or workers were down: close it next time
                    logger.warning("Not closing %s yet: %d reservations have unrated time in it", month, late)
                    continue
                written += invoice_month(month=month, progress=progress)
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])
    return written


def _unrated_before(end: datetime) -> int:
    """Reservations with billed time before ``end`` that no usage record covers yet: active time, or a
    released term's committed rest (models.billed_interval, in SQL)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT count(*) FROM {Reservation._meta.db_table} r
                WHERE r.billing_settled_at IS NULL AND r.state = ANY(%(states)s)
                  AND coalesce(r.activated_at, r.released_early_at) < %(end)s
                  AND coalesce(
                        (SELECT max(upper(u.period)) FROM {UsageRecord._meta.db_table} u WHERE u.reservation_id = r.id),
                        coalesce(r.activated_at, r.released_early_at)
                      ) < least(
                        CASE WHEN r.released_early_at IS NOT NULL THEN upper(r.period)
                             ELSE coalesce(r.deactivated_at, 'infinity') END,
                        %(end)s)""",
            {"end": end, "states": [ReservationState.ACTIVE, *SETTLING_STATES]},
        )
        return cursor.fetchone()[0]


def _uninvoiced(month: date) -> list:
    start, end = month_bounds(month)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT DISTINCT u.organization_id FROM {UsageRecord._meta.db_table} u
                WHERE u.period <@ tstzrange(%s, %s, '[)') AND NOT EXISTS (
                    SELECT 1 FROM {Invoice._meta.db_table} i
                    WHERE i.organization_id = u.organization_id AND i.month = %s)
                ORDER BY 1""",
            [start, end, month],
        )
        return [row[0] for row in cursor.fetchall()]


def invoice_month(*, month: date, progress: Callable[[int], None] | None = None) -> int:
    """Finalize ``month`` for every tenant with usage in it and no invoice yet, a chunk of tenants per
    transaction (a killed run is resumed by the next). Returns invoices written."""
    organizations = _uninvoiced(month)
    written = 0
    for i in range(0, len(organizations), CHUNK):
        chunk = organizations[i : i + CHUNK]
        with transaction.atomic():
            written += _write(month=month, organization_ids=chunk)
        if progress:
            progress(len(chunk))
    return written


def _write(*, month: date, organization_ids: list) -> int:
    slugs = dict(Organization.objects.filter(pk__in=organization_ids).values_list("pk", "slug"))
    invoices, lines = [], []
    for organization_id, org_lines in invoice_lines(organization_ids=organization_ids, month=month).items():
        totals = invoice_totals(month=month, lines=org_lines)
        invoice = Invoice(
            organization_id=organization_id,
            number=f"NC-{month:%Y%m}-{slugs[organization_id]}",
            month=month,
            total=totals["total"],
            gpu_hours=totals["gpu_hours"],
            energy_kwh=totals["energy_kwh"],
        )
        invoices.append(invoice)
        lines += [
            InvoiceLine(
                invoice=invoice,
                reservation_id=line["reservation_id"],
                endpoint_id=line["endpoint_id"],
                description=line["description"][:300],
                seconds=line["seconds"],
                gpu_count=line["gpu_count"],
                gpu_hours=line["gpu_hours"],
                price_per_gpu_hour=line["price_per_gpu_hour"],
                amount=line["amount"],
                energy_kwh=line["energy_kwh"],
                replica_hours=line["replica_hours"],
                requests=line["requests"],
                input_tokens=line["input_tokens"],
            )
            for line in org_lines
        ]
    Invoice.objects.bulk_create(invoices)
    InvoiceLine.objects.bulk_create(lines, batch_size=5000)
    return len(invoices)


def cost_tick(*, now: datetime | None = None) -> int:
    """Push each tenant with something active its running cost and balance (beat, every few seconds),
    all from one event loop. Returns tenants told."""
    ticks = cost_ticks(now=now or timezone.now())
    try:
        publish_many([(tenant_group(organization_id), "billing.cost", tick) for organization_id, tick in ticks.items()])
    except Exception:  # noqa: BLE001 - the next tick carries the same, newer
        logger.exception("Could not push the cost ticks")
    return len(ticks)
