"""Reads of billing: balances, usage, running cost, invoices. Tenant-facing functions take a
TenantContext; the organization-id ones serve services and operator pages."""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import connection
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.db.models import DateTimeField, F, Func, Max, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from console.kernel.errors import NotFound
from marketplace.choices import SETTLING_STATES, AccountKind, ReservationState
from marketplace.models import (
    Allocation,
    BillingNotice,
    BillingProfile,
    Invoice,
    LedgerEntry,
    Replica,
    Reservation,
    SpendAlert,
    UsageRecord,
)
from marketplace.money import cents, cost, month_bounds, month_start, seconds_between
from marketplace.selectors.endpoints import endpoint_traffic_totals
from marketplace.tenant_context import TenantContext
from provisioning.models import Gpu, GpuRollup

ZERO = Decimal(0)
HOURS = Decimal("0.0001")
KWH = Decimal("0.001")
MJ_PER_KWH = Decimal(3_600_000_000)


def account_balances(*, organization_ids) -> dict:
    """``{organization_id: {kind: balance}}`` for every account of these organizations."""
    result = defaultdict(lambda: dict.fromkeys(AccountKind.values, ZERO))
    rows = (
        LedgerEntry.objects.filter(account__organization_id__in=list(organization_ids))
        .values_list("account__organization_id", "account__kind")
        .annotate(total=Sum("amount"))
    )
    for organization_id, kind, total in rows:
        result[organization_id][kind] = total
    return result


def ledger_balance(*, organization_id) -> Decimal:
    """Prepaid and not yet spent (credits + holds), rated usage only: one indexed sum."""
    total = (
        LedgerEntry.objects.filter(
            account__organization_id=organization_id, account__kind__in=[AccountKind.CREDITS, AccountKind.HOLDS]
        )
        .aggregate(total=Sum("amount"))
        .get("total")
    )
    return total or ZERO


def credit_limit_of(*, organization_id) -> Decimal:
    limit = BillingProfile.objects.filter(organization_id=organization_id).values_list("credit_limit", flat=True)
    return limit.first() or ZERO


def spendable(*, organization_id) -> Decimal:
    """What new holds may take: the credits plus the credit line."""
    credits = (
        LedgerEntry.objects.filter(account__organization_id=organization_id, account__kind=AccountKind.CREDITS)
        .aggregate(total=Sum("amount"))
        .get("total")
    )
    return (credits or ZERO) + credit_limit_of(organization_id=organization_id)


def spent_in_month(*, organization_id, month: date) -> Decimal:
    start, end = month_bounds(month)
    total = UsageRecord.objects.filter(
        organization_id=organization_id, period__contained_by=DateTimeTZRange(start, end, "[)")
    ).aggregate(total=Sum("amount"))["total"]
    return total or ZERO


def balance_of(*, organization_id, now: datetime | None = None) -> dict:
    """The tenant's money: ``balance`` (prepaid and not spent, holds included), ``held``,
    ``available`` (what is not held), ``credit_limit``, ``spent`` (all time) and ``spent_this_month``."""
    return balances_of(organization_ids=[organization_id], now=now)[organization_id]


def balances_of(*, organization_ids, now: datetime | None = None) -> dict:
    """balance_of for many tenants at once, in three queries: ``{organization_id: balance}``."""
    now = now or timezone.now()
    organization_ids = list(organization_ids)
    kinds = account_balances(organization_ids=organization_ids)
    profiles = {
        p["organization_id"]: p
        for p in BillingProfile.objects.filter(organization_id__in=organization_ids).values(
            "organization_id", "credit_limit", "depleted_at"
        )
    }
    start, end = month_bounds(month_start(now))
    month_spend = dict(
        UsageRecord.objects.filter(
            organization_id__in=organization_ids, period__contained_by=DateTimeTZRange(start, end, "[)")
        )
        .values_list("organization_id")
        .annotate(total=Sum("amount"))
    )
    result = {}
    for organization_id in organization_ids:
        accounts, profile = kinds[organization_id], profiles.get(organization_id, {})
        credits, held = accounts[AccountKind.CREDITS], accounts[AccountKind.HOLDS]
        result[organization_id] = {
            "balance": credits + held,
            "available": credits,
            "held": held,
            "credit_limit": profile.get("credit_limit", ZERO),
            "spent": accounts[AccountKind.USAGE],
            "spent_this_month": month_spend.get(organization_id, ZERO),
            "depleted_at": profile.get("depleted_at"),
        }
    return result


def balance_json(balance: dict) -> dict:
    """The balance for JSON (pushes and the API): money as strings of cents."""
    return {
        key: (str(cents(value)) if isinstance(value, Decimal) else value.isoformat() if value else None)
        for key, value in balance.items()
    }


def hold_remaining(*, reservation_ids) -> dict:
    """``{reservation_id: what is still held for it}`` (absent: nothing)."""
    rows = (
        LedgerEntry.objects.filter(reservation_id__in=list(reservation_ids), account__kind=AccountKind.HOLDS)
        .values_list("reservation_id")
        .annotate(total=Sum("amount"))
    )
    return {reservation_id: total for reservation_id, total in rows if total}


def rated_until(*, reservation_ids) -> dict:
    """``{reservation_id: end of its last usage record}`` (absent: nothing rated yet)."""
    if not reservation_ids:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT reservation_id, max(upper(period)) FROM {UsageRecord._meta.db_table} "
            "WHERE reservation_id = ANY(%s) GROUP BY reservation_id",
            [list(reservation_ids)],
        )
        return dict(cursor.fetchall())


def reservation_cost(*, reservation: Reservation, now: datetime | None = None) -> Decimal:
    """What a reservation has cost so far: its billed seconds at its price (rated or not yet) -- its
    active time, and for a reserved term released early the committed rest as it elapses."""
    interval = reservation.billed_interval(now or timezone.now())
    if interval is None:
        return ZERO
    return cost(
        price_per_gpu_hour=reservation.price_per_gpu_hour,
        gpus=reservation.gpu_count,
        seconds=seconds_between(*interval),
    )


def usage_of(*, tenant: TenantContext, start: datetime, end: datetime) -> dict:
    """Rated usage in [start, end), per reservation and per inference endpoint (its replicas' slice
    reservations added up, with their energy and the requests and input tokens its gateways answered
    in the window), with totals of both (GET /api/v1/usage/)."""
    window = DateTimeTZRange(start, end, "[)")
    rows = (
        UsageRecord.objects.filter(organization=tenant.organization, period__overlap=window)
        .values("reservation_id")
        .annotate(seconds=Sum("seconds"), amount=Sum("amount"), last=Max("created_at"))
        .order_by("reservation_id")
    )
    rows = list(rows)
    reservations = Reservation.objects.select_related("offer__site", "offer__accelerator_type").in_bulk(
        [row["reservation_id"] for row in rows]
    )
    organization_ids = [tenant.organization.pk]
    replicas = _replicas_of(reservation_ids=list(reservations), organization_ids=organization_ids)
    energy = (
        _energy_mj(organization_ids=organization_ids, window=window, overlapping=True, only=list(replicas))
        if replicas
        else {}
    )
    lines, endpoints = [], {}
    seconds = gpu_hours = amount = ZERO
    for row in rows:
        reservation = reservations[row["reservation_id"]]
        seconds += row["seconds"]
        gpu_hours += row["seconds"] * reservation.gpu_count / 3600
        amount += row["amount"]
        replica = replicas.get(reservation.pk)
        if replica is None:
            lines.append(
                {
                    "reservation": reservation,
                    "seconds": row["seconds"],
                    "gpu_hours": row["seconds"] * reservation.gpu_count / 3600,
                    "amount": row["amount"],
                }
            )
            continue
        rollup = endpoints.get(replica["endpoint_id"])
        if rollup is None:
            rollup = endpoints[replica["endpoint_id"]] = _EndpointUsage(**replica)
        rollup.add(
            seconds=row["seconds"],
            amount=row["amount"],
            gpu_count=reservation.gpu_count,
            price=reservation.price_per_gpu_hour,
            accelerator=reservation.offer.accelerator_type.model,
            site=reservation.offer.site.name,
            energy_mj=energy.get(reservation.pk),
        )
    traffic = endpoint_traffic_totals(endpoint_ids=list(endpoints), start=start, end=end)
    return {
        "start": start,
        "end": end,
        "lines": lines,
        "endpoints": [rollup.figures(traffic.get(rollup.endpoint_id)) for rollup in endpoints.values()],
        "seconds": seconds,
        "gpu_hours": gpu_hours,
        "amount": amount,
    }


def invoice_list(*, tenant: TenantContext) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organization=tenant.organization).order_by("-month")


def invoice_get(*, tenant: TenantContext, invoice_id) -> Invoice:
    try:
        return invoice_list(tenant=tenant).prefetch_related("lines").get(pk=invoice_id)
    except (Invoice.DoesNotExist, ValidationError, ValueError):
        raise NotFound("No such invoice in this organization.") from None


def spend_alert_list(*, tenant: TenantContext) -> QuerySet[SpendAlert]:
    return SpendAlert.objects.filter(organization=tenant.organization).order_by("threshold")


def spend_alert_get(*, tenant: TenantContext, alert_id) -> SpendAlert:
    try:
        return spend_alert_list(tenant=tenant).get(pk=alert_id)
    except (SpendAlert.DoesNotExist, ValidationError, ValueError):
        raise NotFound("No such spend alert in this organization.") from None


def notice_list(*, tenant: TenantContext, limit: int = 20) -> list[BillingNotice]:
    return list(BillingNotice.objects.filter(organization=tenant.organization).order_by("-created_at")[:limit])


def _month_range(month: date) -> DateTimeTZRange:
    return DateTimeTZRange(*month_bounds(month), "[)")


@dataclass
class _EndpointUsage:
    """One endpoint's replicas' rated usage in a period, added up exactly; rounded once, where shown."""

    endpoint_id: object
    name: str
    model: str
    replicas: int = 0
    seconds: Decimal = ZERO
    gpu_seconds: Decimal = ZERO
    amount: Decimal = ZERO
    energy_mj: int = 0
    gpu_count: int = 0
    start: datetime | None = None
    end: datetime | None = None
    prices: set = field(default_factory=set)
    accelerators: set = field(default_factory=set)
    sites: dict = field(default_factory=dict)  # ordered: where its first replicas ran first

    def add(self, *, seconds, amount, gpu_count, price, accelerator, site, energy_mj, start=None, end=None) -> None:
        self.replicas += 1
        self.seconds += seconds
        self.gpu_seconds += seconds * gpu_count
        self.amount += amount
        self.energy_mj += energy_mj or 0
        self.gpu_count = max(self.gpu_count, gpu_count)
        self.prices.add(price)
        self.accelerators.add(accelerator)
        self.sites[site] = None
        if start is not None:
            self.start = start if self.start is None else min(self.start, start)
        if end is not None:
            self.end = end if self.end is None else max(self.end, end)

    def figures(self, traffic: dict | None) -> dict:
        traffic = traffic or {}
        return {
            "endpoint_id": self.endpoint_id,
            "name": self.name,
            "model": self.model,
            "replicas": self.replicas,
            "seconds": self.seconds,
            "replica_hours": (self.seconds / 3600).quantize(HOURS),
            "gpu_count": self.gpu_count,
            "gpu_hours": (self.gpu_seconds / 3600).quantize(HOURS),
            "price_per_gpu_hour": next(iter(self.prices)) if len(self.prices) == 1 else None,
            "requests": traffic.get("requests") or 0,
            "input_tokens": traffic.get("input_tokens") or 0,
            "energy_kwh": _kwh(self.energy_mj),
            "amount": self.amount,  # exact: the sum of its replicas' usage records
        }

    def invoice_line(self, traffic: dict | None) -> dict:
        figures = self.figures(traffic)
        replicas = f"{self.replicas} replica{'s' if self.replicas != 1 else ''}"
        slices = f"{self.gpu_count}× {' / '.join(sorted(self.accelerators))} slice{'s' if self.replicas != 1 else ''}"
        return {
            "reservation_id": None,
            "endpoint_id": self.endpoint_id,
            "description": (
                f"Inference endpoint {self.name} ({self.model}) · {replicas} on {slices} · {', '.join(self.sites)}"
                f" · {self.start:%b %d %H:%M}–{self.end:%b %d %H:%M} UTC"
            ),
            "seconds": figures["seconds"],
            "gpu_count": figures["gpu_count"],
            "gpu_hours": figures["gpu_hours"],
            "price_per_gpu_hour": figures["price_per_gpu_hour"],
            "amount": cents(self.amount),  # the sum of its replicas' exact usage, rounded once
            "energy_kwh": figures["energy_kwh"],
            "replica_hours": figures["replica_hours"],
            "requests": figures["requests"],
            "input_tokens": figures["input_tokens"],
        }


def _kwh(energy_mj) -> Decimal:
    return (Decimal(energy_mj or 0) / MJ_PER_KWH).quantize(KWH)


def _replicas_of(*, reservation_ids, organization_ids) -> dict:
    """``{reservation_id: {"endpoint_id", "name", "model"}}`` for those of these reservations that are an
    endpoint's replicas, the endpoint of the reservation's own organization only."""
    if not reservation_ids:
        return {}
    rows = Replica.objects.filter(
        reservation_id__in=list(reservation_ids),
        endpoint__organization_id__in=list(organization_ids),
        endpoint__organization_id=F("reservation__organization_id"),
    ).values_list("reservation_id", "endpoint_id", "endpoint__name", "endpoint__model__name")
    return {
        reservation_id: {"endpoint_id": endpoint_id, "name": name, "model": model}
        for reservation_id, endpoint_id, name, model in rows
    }


def _energy_mj(*, organization_ids, window: DateTimeTZRange, overlapping: bool = False, only=None) -> dict:
    """``{reservation_id: energy (mJ)}`` its GPUs drew while it was active, within the span of its usage
    records inside ``window`` (or, ``overlapping``, touching it); ``only`` some reservations."""
    rated = "period && %(window)s" if overlapping else "period <@ %(window)s"
    only_sql = "AND reservation_id = ANY(%(only)s)" if only is not None else ""
    # Energy in whole minutes inside the rated (active) span, of the GPUs its allocations hold, as
    # provisioning.selectors.telemetry reads it for a tenant: a minute cut by the span's ends may
    # hold another holder's draw, and the node's other GPUs may be another tenant's slice.
    # Clipped to the active interval: a term released early is billed past it, but its nodes are
    # someone else's then.
    with connection.cursor() as cursor:
        cursor.execute(
            f"""WITH rated AS (
                    SELECT reservation_id, min(lower(period)) s, max(upper(period)) e
                    FROM {UsageRecord._meta.db_table}
                    WHERE organization_id = ANY(%(orgs)s) AND {rated} {only_sql} GROUP BY 1),
                spans AS (
                    SELECT rated.reservation_id, greatest(rated.s, res.activated_at) s,
                           least(rated.e, coalesce(res.deactivated_at, 'infinity')) e
                    FROM rated JOIN {Reservation._meta.db_table} res ON res.id = rated.reservation_id
                    WHERE res.activated_at IS NOT NULL)
                SELECT spans.reservation_id, sum(r.energy_mj)
                FROM spans
                JOIN {Allocation._meta.db_table} a ON a.reservation_id = spans.reservation_id
                JOIN {Gpu._meta.db_table} g ON g.node_id = a.node_id AND a.gpus @> g.index::int
                JOIN {GpuRollup._meta.db_table} r
                  ON r.gpu_id = g.id
                 AND r.minute >= date_trunc('minute', spans.s + interval '1 minute' - interval '1 microsecond')
                 AND r.minute + interval '1 minute' <= spans.e
                GROUP BY 1""",
            {"orgs": list(organization_ids), "window": window, "only": list(only or [])},
        )
        return dict(cursor.fetchall())


def invoice_lines(*, organization_ids, month: date) -> dict:
    """``{organization_id: [line, ...]}``: per reservation, its rated usage in the month, with the
    energy its GPUs drew meanwhile; per inference endpoint, one line for all its replicas' slice
    reservations (their usage added up exactly, rounded once; replica-hours, GPU-hours, energy, and the
    requests and input tokens its gateways answered in the month). The month's invoice (or, for the
    month in progress, its preview). Five queries whatever the number of tenants."""
    organization_ids = list(organization_ids)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""SELECT u.organization_id, u.reservation_id, sum(u.seconds), sum(u.amount),
                       min(lower(u.period)), max(upper(u.period))
                FROM {UsageRecord._meta.db_table} u
                WHERE u.organization_id = ANY(%(orgs)s) AND u.period <@ %(month)s
                GROUP BY 1, 2 ORDER BY 1, 5""",
            {"orgs": organization_ids, "month": _month_range(month)},
        )
        usage = cursor.fetchall()
    if not usage:
        return {}
    energy = _energy_mj(organization_ids=organization_ids, window=_month_range(month))
    reservations = {
        r["id"]: r
        for r in Reservation.objects.filter(pk__in=[row[1] for row in usage]).values(
            "id",
            "gpu_count",
            "price_per_gpu_hour",
            "term_months",
            "offer__shape",
            "offer__gpus_per_node",
            "offer__gpus_per_instance",
            "offer__accelerator_type__model",
            "offer__site__name",
            "node_count",
            "released_early_at",
        )
    }
    replicas = _replicas_of(reservation_ids=list(reservations), organization_ids=organization_ids)
    lines = defaultdict(list)
    endpoints: dict[tuple, tuple[_EndpointUsage, int]] = {}  # (organization, endpoint): (its usage, its line's index)
    for organization_id, reservation_id, seconds, amount, start, end in usage:
        r = reservations[reservation_id]
        model = r["offer__accelerator_type__model"]
        replica = replicas.get(reservation_id)
        if replica is not None:  # an endpoint's replica: its usage goes on the endpoint's line
            key = (organization_id, replica["endpoint_id"])
            if key not in endpoints:
                endpoints[key] = (_EndpointUsage(**replica), len(lines[organization_id]))
                lines[organization_id].append(None)  # the endpoint's line, in the place of its first replica
            endpoints[key][0].add(
                seconds=seconds,
                amount=amount,
                gpu_count=r["gpu_count"],
                price=r["price_per_gpu_hour"],
                accelerator=model,
                site=r["offer__site__name"],
                energy_mj=energy.get(reservation_id),
                start=start,
                end=end,
            )
            continue
        if r["offer__shape"] == "node" and r["offer__gpus_per_instance"] < r["offer__gpus_per_node"]:
            what = f"{r['gpu_count']}× {model} instance (a slice of one node)"
        else:
            kind = "rack" if r["offer__shape"] == "rack" else "node" if r["node_count"] == 1 else "nodes"
            what = f"{r['node_count']}× {r['offer__gpus_per_node']}× {model} {kind}"
        term = f", {r['term_months']}-month term" if r["term_months"] else ""
        if r["released_early_at"] is not None:
            term += f" (released {r['released_early_at']:%b %d %H:%M}; the rest of the term is committed)"
        lines[organization_id].append(
            {
                "reservation_id": reservation_id,
                "endpoint_id": None,
                "description": (f"{what} · {r['offer__site__name']}{term} · {start:%b %d %H:%M}–{end:%b %d %H:%M} UTC"),
                "seconds": seconds,
                "gpu_count": r["gpu_count"],
                "gpu_hours": (seconds * r["gpu_count"] / 3600).quantize(HOURS),
                "price_per_gpu_hour": r["price_per_gpu_hour"],
                "amount": cents(amount),
                "energy_kwh": _kwh(energy.get(reservation_id)),
                "replica_hours": None,
                "requests": None,
                "input_tokens": None,
            }
        )
    if endpoints:
        start, end = month_bounds(month)
        traffic = endpoint_traffic_totals(endpoint_ids={key[1] for key in endpoints}, start=start, end=end)
        for (organization_id, endpoint_id), (rollup, index) in endpoints.items():
            lines[organization_id][index] = rollup.invoice_line(traffic.get(endpoint_id))
    return dict(lines)


def invoice_preview(*, tenant: TenantContext, now: datetime | None = None) -> dict:
    """The month in progress, as its invoice would read if it closed now (rated usage only)."""
    month = month_start(now or timezone.now())
    lines = invoice_lines(organization_ids=[tenant.organization.pk], month=month).get(tenant.organization.pk, [])
    return invoice_totals(month=month, lines=lines)


def invoice_totals(*, month: date, lines: list[dict]) -> dict:
    return {
        "month": month,
        "lines": lines,
        "total": sum((line["amount"] for line in lines), ZERO),
        "gpu_hours": sum((line["gpu_hours"] for line in lines), ZERO),
        "energy_kwh": sum((line["energy_kwh"] for line in lines), ZERO),
    }


def cost_ticks(*, now: datetime, organization_id=None) -> dict:
    """For every tenant with something active (or only ``organization_id``, for a page rendering the
    ticker's first values): its balance and each active reservation's cost so far, with what is not
    yet rated (the live ticker; one pass, a few queries)."""
    active = Reservation.objects.filter(state=ReservationState.ACTIVE)
    if organization_id is not None:
        active = active.filter(organization_id=organization_id)
    active = list(active.values("id", "organization_id", "activated_at", "gpu_count", "price_per_gpu_hour"))
    if not active:
        return {}
    until = rated_until(reservation_ids=[r["id"] for r in active])
    by_org = defaultdict(list)
    for r in active:
        by_org[r["organization_id"]].append(r)
    balances = account_balances(organization_ids=by_org)
    ticks = {}
    for organization_id, reservations in by_org.items():
        per_reservation, unrated, per_hour = {}, ZERO, ZERO
        for r in reservations:
            price, gpus = r["price_per_gpu_hour"], r["gpu_count"]
            so_far = cost(
                price_per_gpu_hour=price, gpus=gpus, seconds=max(seconds_between(r["activated_at"], now), ZERO)
            )
            rated_to = until.get(r["id"])
            rated = (
                cost(price_per_gpu_hour=price, gpus=gpus, seconds=seconds_between(r["activated_at"], rated_to))
                if rated_to
                else ZERO
            )
            unrated += max(so_far - rated, ZERO)
            per_hour += price * gpus
            per_reservation[str(r["id"])] = {"cost": str(cents(so_far)), "per_hour": str(price * gpus)}
        kinds = balances[organization_id]
        ticks[organization_id] = {
            "as_of": now.isoformat(),
            "balance": str(cents(kinds[AccountKind.CREDITS] + kinds[AccountKind.HOLDS] - unrated)),
            "unrated": str(cents(unrated)),
            "per_hour": str(per_hour),
            "reservations": per_reservation,
        }
    return ticks


def reservations_to_rate_count() -> int:
    """Reservations a rating run would look at now (for progress bars)."""
    return Reservation.objects.filter(
        billing_settled_at__isnull=True, state__in=[ReservationState.ACTIVE, *SETTLING_STATES]
    ).count()


def daily_spend(*, tenant: TenantContext, month: date, now: datetime | None = None) -> list[dict]:
    """Rated usage of ``month`` per UTC day, ``[{"day", "amount"}]`` for every day of the month (up to
    today for the month in progress), zero where nothing was spent: the billing page's chart. A usage
    record counts on the day it starts (records are one rating run long, a minute or so; none crosses
    a month, so the month's days sum to its invoice before rounding)."""
    now = now or timezone.now()
    start, end = month_bounds(month)
    rows = (
        UsageRecord.objects.filter(organization=tenant.organization, period__contained_by=DateTimeTZRange(start, end))
        .annotate(day=TruncDate(Func("period", function="lower", output_field=DateTimeField()), tzinfo=UTC))
        .values("day")
        .annotate(total=Sum("amount"))
        .order_by("day")
    )
    spent = {row["day"]: row["total"] for row in rows}
    stop = end if now >= end else max(now, start) + timedelta(days=1)  # the month in progress: up to today
    days = [start.date() + timedelta(days=n) for n in range((stop.date() - start.date()).days)]
    return [{"day": day, "amount": spent.get(day, ZERO)} for day in days]
