"""Serializers of billing: the balance, rated usage, invoices, spend alerts and notices. Money leaves as
decimal strings, never floats: cents where people read it, and the ledger's ten decimal places where a
client wants to reconcile (``amount_exact``)."""

from datetime import UTC, datetime, timedelta

from django.utils import timezone
from rest_framework import serializers

from marketplace.api.fields import MoneyField
from marketplace.models import Invoice, SpendAlert
from marketplace.money import month_start

CURRENCY = "USD"


MAX_USAGE_WINDOW = timedelta(days=400)  # about 13 months: a year compared with the month before it


def _money(**kwargs) -> MoneyField:
    """Dollars and cents, as a string (sums over months: two digits more than a reservation's)."""
    return MoneyField(max_digits=16, **kwargs)


class BalanceSerializer(serializers.Serializer):
    currency = serializers.CharField()
    balance = _money(help_text="Prepaid and not spent: what is available plus what is held.")
    available = _money(help_text="Not held for reservations; negative when a credit line is in use.")
    held = _money(help_text="Set aside for reservations' expected cost; released as usage is rated.")
    credit_limit = _money(help_text="How far below zero holds may take the balance (set by operators).")
    spent = _money(help_text="Rated usage, all time.")
    spent_this_month = _money(help_text="Rated usage this calendar month (UTC).")
    depleted_at = serializers.DateTimeField(
        allow_null=True, help_text="When the balance ran out, if it has; on-demand reservations are released later."
    )


class UsageQuerySerializer(serializers.Serializer):
    start = serializers.DateTimeField(required=False, help_text="Default: the first of this month (UTC).")
    end = serializers.DateTimeField(required=False, help_text="Default: now. At most about 13 months after start.")

    def validate(self, attrs):
        now = timezone.now()
        start = attrs.get("start") or datetime.combine(month_start(now), datetime.min.time(), tzinfo=UTC)
        end = attrs.get("end") or now
        # Without an end, the end is now: then the start is what the client can change.
        fault, other = ("end", "the start") if "end" in attrs else ("start", "now (the end when none is given)")
        if end <= start:
            side = "after" if fault == "end" else "before"
            raise serializers.ValidationError({fault: [f"Must be {side} {other}."]})
        if end - start > MAX_USAGE_WINDOW:
            side = "after" if fault == "end" else "before"
            raise serializers.ValidationError({fault: [f"At most {MAX_USAGE_WINDOW.days} days {side} {other}."]})
        return {"start": start, "end": end}


class UsageLineSerializer(serializers.Serializer):
    reservation = serializers.UUIDField(source="reservation.id")
    offer = serializers.CharField(source="reservation.offer.__str__")
    offer_id = serializers.IntegerField(source="reservation.offer_id")
    term_months = serializers.IntegerField(source="reservation.term_months", allow_null=True)
    gpu_count = serializers.IntegerField(source="reservation.gpu_count")
    price_per_gpu_hour = serializers.DecimalField(
        source="reservation.price_per_gpu_hour", max_digits=10, decimal_places=4
    )
    seconds = serializers.DecimalField(max_digits=16, decimal_places=6, help_text="Active seconds rated.")
    gpu_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    amount = _money(help_text="Charged, rounded to cents.")
    amount_exact = serializers.DecimalField(
        source="amount", max_digits=24, decimal_places=10, help_text="Charged, as the ledger holds it."
    )


class UsageEndpointSerializer(serializers.Serializer):
    endpoint = serializers.UUIDField(source="endpoint_id")
    name = serializers.CharField(help_text="The endpoint's name (what clients send as `model`).")
    model = serializers.CharField(help_text="The served model.")
    replicas = serializers.IntegerField(help_text="Replicas (each a GPU slice reservation) with usage rated.")
    seconds = serializers.DecimalField(max_digits=18, decimal_places=6, help_text="Replica-seconds rated.")
    replica_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    gpu_count = serializers.IntegerField(help_text="GPUs per replica.")
    gpu_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    price_per_gpu_hour = serializers.DecimalField(
        max_digits=10, decimal_places=4, allow_null=True, help_text="Null when its replicas ran at different prices."
    )
    requests = serializers.IntegerField(help_text="Requests the gateways answered for it in the window, any outcome.")
    input_tokens = serializers.IntegerField()
    energy_kwh = serializers.DecimalField(
        max_digits=16, decimal_places=3, help_text="What its replicas' GPUs drew while they were active."
    )
    amount = _money(help_text="Its replicas' usage, added up exactly and rounded to cents once.")
    amount_exact = serializers.DecimalField(
        source="amount", max_digits=24, decimal_places=10, help_text="Charged, as the ledger holds it."
    )


class UsageSerializer(serializers.Serializer):
    currency = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    seconds = serializers.DecimalField(max_digits=18, decimal_places=6)
    gpu_hours = serializers.DecimalField(max_digits=18, decimal_places=4)
    amount = _money(help_text="The exact total, rounded to cents once.")
    amount_exact = serializers.DecimalField(source="amount", max_digits=24, decimal_places=10)
    lines = UsageLineSerializer(
        many=True, help_text="Per reservation: its rated usage overlapping the window (endpoints' replicas: below)."
    )
    endpoints = UsageEndpointSerializer(
        many=True, help_text="Per inference endpoint: its replicas' rated usage overlapping the window, added up."
    )


class InvoiceLineSerializer(serializers.Serializer):
    reservation = serializers.UUIDField(
        source="reservation_id", allow_null=True, help_text="Null on an endpoint's line."
    )
    endpoint = serializers.UUIDField(
        source="endpoint_id", allow_null=True, help_text="The inference endpoint whose replicas this line adds up."
    )
    description = serializers.CharField()
    seconds = serializers.DecimalField(
        max_digits=16, decimal_places=6, help_text="Active seconds (an endpoint's: replica-seconds)."
    )
    gpu_count = serializers.IntegerField(help_text="GPUs held (an endpoint's: per replica).")
    gpu_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    price_per_gpu_hour = serializers.DecimalField(
        max_digits=10,
        decimal_places=4,
        allow_null=True,
        help_text="Null when an endpoint's replicas ran at different prices.",
    )
    amount = _money()
    energy_kwh = serializers.DecimalField(max_digits=16, decimal_places=3)
    replica_hours = serializers.DecimalField(
        max_digits=16, decimal_places=4, allow_null=True, help_text="An endpoint's line only."
    )
    requests = serializers.IntegerField(
        allow_null=True, help_text="An endpoint's line only: requests its gateways answered in the month, any outcome."
    )
    input_tokens = serializers.IntegerField(allow_null=True, help_text="An endpoint's line only.")


class InvoiceSerializer(serializers.ModelSerializer):
    status = serializers.CharField(read_only=True, help_text='"finalized": written once, never changed.')

    class Meta:
        model = Invoice
        fields = ["id", "number", "month", "status", "currency", "total", "gpu_hours", "energy_kwh", "finalized_at"]
        read_only_fields = fields


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(many=True, read_only=True)

    class Meta(InvoiceSerializer.Meta):
        fields = [*InvoiceSerializer.Meta.fields, "lines"]
        read_only_fields = fields


class InvoicePreviewSerializer(serializers.Serializer):
    month = serializers.DateField()
    status = serializers.CharField(help_text='Always "draft": it changes until the month is finalized.')
    currency = serializers.CharField()
    as_of = serializers.DateTimeField(help_text="Usage rated until about now; the running minute may be missing.")
    total = _money()
    gpu_hours = serializers.DecimalField(max_digits=16, decimal_places=4)
    energy_kwh = serializers.DecimalField(max_digits=16, decimal_places=3)
    lines = InvoiceLineSerializer(many=True)


class SpendAlertSerializer(serializers.ModelSerializer):
    threshold = _money(read_only=True)

    class Meta:
        model = SpendAlert
        fields = ["id", "threshold", "last_notified_month", "created_at"]
        read_only_fields = fields


class SpendAlertCreateSerializer(serializers.Serializer):
    # A string, checked by the service (marketplace.money.parse_amount) so that the API and the portal
    # refuse the same inputs with the same words. A JSON number is accepted as well.
    threshold = serializers.CharField(
        max_length=32, help_text='Dollars spent this month, e.g. "250.00": more than 0, at most two decimals.'
    )


class NoticeQuerySerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=100, default=20)


class NoticeSerializer(serializers.Serializer):
    kind = serializers.CharField()
    message = serializers.CharField()
    created_at = serializers.DateTimeField()
