"""Money and time arithmetic of billing, pure and exact. Amounts are Decimal throughout; the ledger
keeps ten decimal places (LEDGER_QUANTUM) and only invoice lines are rounded, to cents."""

import calendar
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext

from console.kernel.errors import DomainError

LEDGER_QUANTUM = Decimal("1e-10")
CENT = Decimal("0.01")
SECONDS_PER_HOUR = Decimal(3600)
MICROSECOND = timedelta(microseconds=1)


def seconds_between(start: datetime, end: datetime) -> Decimal:
    """Exact seconds in [start, end), to the microsecond (no float on the way)."""
    return Decimal((end - start) // MICROSECOND).scaleb(-6)


def cost(*, price_per_gpu_hour: Decimal, gpus: int, seconds: Decimal) -> Decimal:
    """What ``gpus`` GPUs cost for ``seconds`` at ``price_per_gpu_hour``, to the ledger's precision.

    Usage is charged as cost(through the new end) - cost(through the old end) of one active interval,
    so however the interval is cut into rating runs, the total is the cost of the whole."""
    with localcontext(prec=60):
        return (price_per_gpu_hour * gpus * seconds / SECONDS_PER_HOUR).quantize(LEDGER_QUANTUM, ROUND_HALF_EVEN)


def term_price(price_per_gpu_hour: Decimal, percent_off: Decimal) -> Decimal:
    """A reserved term's price per GPU-hour: the on-demand price less the term's discount, to the
    price book's four decimals."""
    return (price_per_gpu_hour * (Decimal(100) - percent_off) / Decimal(100)).quantize(Decimal("0.0001"))


def cents(amount: Decimal) -> Decimal:
    """Round to the cent: invoice lines and what people read, never the ledger."""
    return amount.quantize(CENT, ROUND_HALF_EVEN)


def parse_amount(value, *, field: str = "amount", allow_zero: bool = False) -> Decimal:
    """A positive amount in dollars with at most two decimals, from user input; DomainError if not."""
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        amount = None
    if amount is None or not amount.is_finite():
        raise DomainError(f"{value!r} is not an amount of money.", fields={field: ["Enter a number, e.g. 250.00."]})
    if amount < 0 or (amount == 0 and not allow_zero):
        raise DomainError("The amount must be positive.", fields={field: ["Must be more than 0."]})
    if amount >= Decimal("1e11"):  # before quantize, which cannot hold more than 28 digits
        raise DomainError("That amount is too large.", fields={field: ["At most 99,999,999,999.99."]})
    if amount != amount.quantize(CENT):
        raise DomainError("Amounts have at most two decimals.", fields={field: ["At most two decimals."]})
    return amount


def month_start(moment: datetime | date) -> date:
    return date(moment.year, moment.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) in UTC."""
    return (
        datetime(month.year, month.month, 1, tzinfo=UTC),
        datetime(*next_month(month).timetuple()[:3], tzinfo=UTC),
    )


def split_at_months(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """[start, end) cut at every UTC month boundary inside it."""
    pieces = []
    while start < end:
        boundary = month_bounds(month_start(start.astimezone(UTC)))[1]
        pieces.append((start, min(end, boundary)))
        start = min(end, boundary)
    return pieces


def add_months(moment: datetime, months: int) -> datetime:
    """The same day and time ``months`` later (the last day of a shorter month)."""
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)
