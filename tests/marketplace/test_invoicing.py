"""Monthly invoices (marketplace.services.billing.invoicing, selectors.billing.invoice_lines): written once per
tenant with usage in an ended month, a line per reservation rounded to cents there and only there,
with the energy its GPUs drew while active; never changed afterwards."""

from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from marketplace.choices import ReservationState
from marketplace.models import Invoice, InvoiceLine, Reservation, UsageRecord
from marketplace.money import cents, cost, month_bounds, month_start, seconds_between
from marketplace.selectors.billing import invoice_preview
from marketplace.services.billing.invoicing import _unrated_before, invoice_month, invoices_close
from marketplace.services.billing.metering import usage_rate
from marketplace.services.reservations.lifecycle import (
    reservation_activate,
    reservation_begin,
    reservation_cancel,
    reservation_complete,
    reservation_create,
    reservation_release,
)
from provisioning.models import Gpu
from provisioning.services.telemetry import rollups_write
from provisioning.services.telemetry_ingest import GpuMinute
from tests.factories import make_tenant

S = ReservationState
PRICE = Decimal("2.49")
# The shared offer: $2.49 per GPU-hour, four free 8-GPU nodes.
pytestmark = [pytest.mark.django_db, pytest.mark.offer(price=PRICE, nodes=4)]
MJ_PER_KWH = 3_600_000_000


def previous(month: date) -> date:
    return month_start(month_bounds(month)[0] - timedelta(days=1))


THIS_MONTH = month_start(timezone.now())
LAST_MONTH = previous(THIS_MONTH)
MONTH_BEFORE = previous(LAST_MONTH)


def at(month: date, day: int = 1, hour: int = 0, minute: int = 0) -> datetime:
    return month_bounds(month)[0].replace(day=day, hour=hour, minute=minute)


def reserve(tenant, offer, duration: timedelta, *, quantity: int = 1) -> Reservation:
    start = timezone.now()
    return reservation_create(tenant=tenant, offer=offer, quantity=quantity, start=start, end=start + duration)


def run(reservation: Reservation, start: datetime, end: datetime) -> Reservation:
    """Take it through its whole lifecycle, then move its recorded active interval to [start, end):
    tests cannot wait for months to pass."""
    assert reservation_begin(reservation_id=reservation.pk)
    assert reservation_activate(reservation_id=reservation.pk)
    assert reservation_release(reservation_id=reservation.pk)
    assert reservation_complete(reservation_id=reservation.pk)
    Reservation.objects.filter(pk=reservation.pk).update(activated_at=start, deactivated_at=end)
    reservation.refresh_from_db()
    return reservation


def ran(tenant, offer, start: datetime, end: datetime, *, quantity: int = 1) -> Reservation:
    """A reservation that was active for [start, end)."""
    return run(reserve(tenant, offer, end - start, quantity=quantity), start, end)


def energy(reservation: Reservation, minutes: list[datetime], mj_per_gpu_minute: int) -> None:
    """Telemetry rollups for every GPU of the reservation's nodes, written by the telemetry service."""
    gpus = Gpu.objects.filter(node__allocations__reservation=reservation).values_list("pk", flat=True)
    rollups_write(
        [
            GpuMinute(
                gpu_id=gpu,
                minute=int(minute.timestamp()),
                samples=1,
                util_n=1,
                util_sum=50.0,
                util_max=50.0,
                power_n=1,
                power_sum=700.0,
                power_max=700.0,
                temp_max=60.0,
                fb_used_max=1000.0,
                energy_mj=mj_per_gpu_minute,
            )
            for gpu in gpus
            for minute in minutes
        ]
    )


def line_of(invoice: Invoice, reservation: Reservation) -> InvoiceLine:
    return invoice.lines.get(reservation=reservation)


class TestInvoiceMonth:
    def test_one_finalized_invoice_per_tenant_with_usage_and_a_line_per_reservation(self, offer):
        alice, bob, carol, dave = (make_tenant(name=name) for name in ("Alice AI", "Bob Labs", "Carol Co", "Dave"))
        one = ran(alice, offer, at(MONTH_BEFORE, 3, 10), at(MONTH_BEFORE, 3, 10) + timedelta(seconds=1000))
        two = ran(alice, offer, at(MONTH_BEFORE, 9, 8), at(MONTH_BEFORE, 9, 9, 30), quantity=2)
        bobs = ran(bob, offer, at(MONTH_BEFORE, 20, 23), at(MONTH_BEFORE, 20, 23, 30))
        cancelled = reservation_create(
            tenant=carol,
            offer=offer,
            quantity=1,
            start=timezone.now() + timedelta(hours=1),
            end=timezone.now() + timedelta(hours=2),
        )
        reservation_cancel(tenant=carol, reservation=cancelled)
        usage_rate()

        assert invoice_month(month=MONTH_BEFORE) == 2
        assert set(Invoice.objects.values_list("organization_id", flat=True)) == {
            alice.organization.pk,
            bob.organization.pk,
        }  # Carol's cancelled reservation and Dave's nothing are not invoiced
        invoice = Invoice.objects.get(organization=alice.organization)
        assert invoice.month == MONTH_BEFORE and invoice.status == "finalized" and invoice.currency == "USD"
        assert invoice.number == f"NC-{MONTH_BEFORE:%Y%m}-{alice.organization.slug}"
        assert invoice.lines.count() == 2

        first = line_of(invoice, one)
        assert first.seconds == Decimal(1000) and first.gpu_count == 8
        assert first.gpu_hours == Decimal("2.2222")  # 8 x 1000 s, to four places
        assert first.price_per_gpu_hour == PRICE
        exact = cost(price_per_gpu_hour=PRICE, gpus=8, seconds=Decimal(1000))
        assert exact == Decimal("5.5333333333") and first.amount == Decimal("5.53")  # cents here, and only here
        assert UsageRecord.objects.get(reservation=one).amount == exact
        assert "1× 8× H100 SXM node" in first.description and f"{at(MONTH_BEFORE, 3, 10):%b %d %H:%M}" in (
            first.description
        )

        second = line_of(invoice, two)
        assert second.seconds == Decimal(5400) and second.gpu_count == 16 and second.gpu_hours == Decimal("24")
        assert second.amount == Decimal("59.76") and "2× 8× H100 SXM nodes" in second.description

        assert invoice.total == first.amount + second.amount == Decimal("65.29")
        assert invoice.gpu_hours == first.gpu_hours + second.gpu_hours
        assert Invoice.objects.get(organization=bob.organization).total == Decimal("9.96")
        assert line_of(Invoice.objects.get(organization=bob.organization), bobs).seconds == Decimal(1800)

    def test_a_second_run_writes_nothing(self, offer):
        tenant = make_tenant()
        ran(tenant, offer, at(MONTH_BEFORE, 5, 12), at(MONTH_BEFORE, 5, 13))
        usage_rate()
        assert invoice_month(month=MONTH_BEFORE) == 1
        rows = list(Invoice.objects.values_list("pk", "total", "finalized_at"))
        assert invoice_month(month=MONTH_BEFORE) == 0
        assert list(Invoice.objects.values_list("pk", "total", "finalized_at")) == rows
        assert InvoiceLine.objects.count() == 1

    def test_energy_is_what_the_reservations_gpus_drew_while_it_was_active(self, offer):
        tenant = make_tenant()
        start, end = at(MONTH_BEFORE, 12, 14, 0), at(MONTH_BEFORE, 12, 15, 0)
        reservation = reserve(tenant, offer, end - start)
        other = reserve(make_tenant(), offer, end - start)  # another node at the same time
        assert reservation.allocations.get().node_id != other.allocations.get().node_id
        run(reservation, start, end)
        run(other, start, end)
        inside = [start, start + timedelta(minutes=1), end - timedelta(minutes=1)]
        energy(reservation, inside, 450_000_000)  # 0.125 kWh per GPU-minute
        energy(reservation, [start - timedelta(minutes=1), end, end + timedelta(hours=1)], 999_000_000)  # not active
        energy(other, inside, 777_000_000)  # not its nodes
        usage_rate()
        invoice_month(month=MONTH_BEFORE)
        line = line_of(Invoice.objects.get(organization=tenant.organization), reservation)
        assert line.energy_kwh == Decimal("3.000")  # 8 GPUs x 3 minutes x 0.125 kWh
        assert Invoice.objects.get(organization=tenant.organization).energy_kwh == Decimal("3.000")
        assert line_of(Invoice.objects.get(organization=other.organization), other).energy_kwh == Decimal(
            8 * 3 * 777_000_000 / MJ_PER_KWH
        ).quantize(Decimal("0.001"))

    def test_a_reservation_across_a_month_boundary_is_split_between_the_two_invoices(self, offer):
        tenant = make_tenant()
        boundary = month_bounds(MONTH_BEFORE)[1]
        start, end = boundary - timedelta(hours=2), boundary + timedelta(hours=3, minutes=30)
        reservation = ran(tenant, offer, start, end)
        energy(reservation, [boundary - timedelta(minutes=1), boundary], 360_000_000)  # 0.1 kWh a GPU-minute
        usage_rate()
        records = list(UsageRecord.objects.filter(reservation=reservation).order_by("period"))
        assert [(r.period.lower, r.period.upper) for r in records] == [(start, boundary), (boundary, end)]
        assert invoice_month(month=MONTH_BEFORE) == invoice_month(month=LAST_MONTH) == 1
        before, after = (
            line_of(Invoice.objects.get(organization=tenant.organization, month=month), reservation)
            for month in (MONTH_BEFORE, LAST_MONTH)
        )
        assert (before.seconds, after.seconds) == (Decimal(7200), Decimal(12600))
        assert (before.amount, after.amount) == (Decimal("39.84"), Decimal("69.72"))
        whole = cost(price_per_gpu_hour=PRICE, gpus=8, seconds=seconds_between(start, end))
        assert sum(r.amount for r in records) == whole
        assert (before.energy_kwh, after.energy_kwh) == (Decimal("0.800"), Decimal("0.800"))
        assert f"{start:%b %d %H:%M}–{boundary:%b %d %H:%M}" in before.description
        assert f"{boundary:%b %d %H:%M}–{end:%b %d %H:%M}" in after.description


class TestClosing:
    def test_a_month_is_closed_only_once_the_delay_after_its_end_has_passed(self, offer, settings):
        tenant = make_tenant()
        ran(tenant, offer, at(LAST_MONTH, 10, 9), at(LAST_MONTH, 10, 11))
        delay = timedelta(minutes=settings.INVOICE_CLOSE_DELAY_MINUTES)
        ended = month_bounds(LAST_MONTH)[1]
        assert invoices_close(now=ended + delay - timedelta(minutes=1)) == 0
        assert UsageRecord.objects.exists()  # it rated first
        assert not Invoice.objects.exists()
        assert invoices_close(now=ended + delay + timedelta(minutes=1)) == 1
        invoice = Invoice.objects.get()
        assert invoice.month == LAST_MONTH and invoice.total == Decimal("39.84")
        assert invoices_close(now=ended + delay + timedelta(minutes=2)) == 0

    def test_a_month_with_unrated_active_time_waits_for_its_rating(self, offer):
        tenant = make_tenant()
        ended = month_bounds(LAST_MONTH)[1]
        completed = ran(tenant, offer, at(LAST_MONTH, 10, 9), at(LAST_MONTH, 10, 11))
        assert _unrated_before(ended) == 1  # released, not rated yet
        usage_rate(reservation_ids=[completed.pk])
        assert _unrated_before(ended) == 0
        running = reserve(tenant, offer, timedelta(hours=2))
        assert reservation_begin(reservation_id=running.pk) and reservation_activate(reservation_id=running.pk)
        Reservation.objects.filter(pk=running.pk).update(activated_at=at(LAST_MONTH, 28))
        assert _unrated_before(ended) == 1  # active since last month, nothing rated
        usage_rate(now=ended - timedelta(hours=1))
        assert _unrated_before(ended) == 1  # rated, but not to the month's end
        usage_rate(now=ended + timedelta(minutes=5))
        assert _unrated_before(ended) == 0

    def test_the_month_in_progress_is_a_preview_not_an_invoice(self, offer):
        tenant = make_tenant()
        since = timezone.now() - timedelta(hours=1)
        reservation = reservation_create(
            tenant=tenant, offer=offer, quantity=1, start=timezone.now(), end=timezone.now() + timedelta(hours=2)
        )
        reservation_begin(reservation_id=reservation.pk)
        reservation_activate(reservation_id=reservation.pk)
        Reservation.objects.filter(pk=reservation.pk).update(activated_at=since)
        invoices_close()
        assert not Invoice.objects.exists()
        preview = invoice_preview(tenant=tenant)
        this_month = month_bounds(month_start(timezone.now()))[0]
        rated = sum(
            r.amount for r in UsageRecord.objects.filter(reservation=reservation) if r.period.lower >= this_month
        )
        assert rated > 0 and preview["total"] == cents(rated) and preview["month"] == month_start(timezone.now())

    def test_invoices_cannot_be_updated_or_deleted(self, offer):
        tenant = make_tenant()
        ran(tenant, offer, at(MONTH_BEFORE, 2, 1), at(MONTH_BEFORE, 2, 2))
        usage_rate()
        invoice_month(month=MONTH_BEFORE)
        invoice = Invoice.objects.get()
        line = invoice.lines.get()

        def sql(statement: str, pk) -> None:
            with connection.cursor() as cursor:
                cursor.execute(statement, [pk])

        attempts = [
            lambda: Invoice.objects.filter(pk=invoice.pk).update(total=0),
            lambda: InvoiceLine.objects.filter(pk=line.pk).update(amount=0),
            lambda: line.delete(),
            lambda: sql("UPDATE marketplace_invoice SET total = 0 WHERE id = %s", invoice.pk),
            lambda: sql("DELETE FROM marketplace_invoiceline WHERE id = %s", line.pk),
            lambda: sql("DELETE FROM marketplace_invoice WHERE id = %s", invoice.pk),
        ]
        for attempt in attempts:
            with pytest.raises(IntegrityError, match="immutable"), transaction.atomic():
                attempt()
        assert Invoice.objects.get().total == Decimal("19.92") and InvoiceLine.objects.get().amount == Decimal("19.92")
