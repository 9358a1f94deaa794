"""Billing (ARCHITECTURE invariant 4): the price book, metered usage, the double-entry ledger, spend
control and invoices. Written only by the marketplace.services billing modules (pricing, ledger,
metering, spend, invoicing); read through marketplace.selectors.billing."""

import uuid
from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import DateTimeRangeField, RangeOperators
from django.contrib.postgres.indexes import GistIndex
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from marketplace.choices import PLATFORM_ACCOUNT_KINDS, AccountKind, NoticeKind, TransactionKind

from .catalog import Offer
from .endpoints import Endpoint
from .reservations import Reservation
from .tenancy import Organization

# Ledger amounts keep ten decimal places (a per-second share of a GPU-hour price); only invoice lines
# are rounded, to cents.
AMOUNT = {"max_digits": 24, "decimal_places": 10}


class OfferPrice(models.Model):
    """The price book: an offer's on-demand price per GPU-hour from ``effective_from`` on. The latest
    row in force is the offer's price (Offer.price_per_gpu_hour mirrors it for listing); reservations
    keep the price they were made at. Term prices are this price less the offer's term discount."""

    offer = models.ForeignKey(Offer, on_delete=models.CASCADE, related_name="prices")
    effective_from = models.DateTimeField()
    price_per_gpu_hour = models.DecimalField(
        "on-demand price per GPU-hour (USD)",
        max_digits=10,
        decimal_places=4,
        validators=[MinValueValidator(Decimal("0"))],
    )
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["offer", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["offer", "effective_from"], name="offer_price_unique_from"),
            models.CheckConstraint(condition=models.Q(price_per_gpu_hour__gte=0), name="offer_price_row_non_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.price_per_gpu_hour}/GPU-h from {self.effective_from:%Y-%m-%d %H:%M}"


class LedgerAccount(models.Model):
    """A tenant's credits, holds or usage, or a platform account (no organization)."""

    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, null=True, blank=True, related_name="ledger_accounts"
    )
    kind = models.CharField(max_length=16, choices=AccountKind.choices)

    class Meta:
        ordering = ["organization", "kind"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "kind"], nulls_distinct=False, name="ledger_account_unique"
            ),
            models.CheckConstraint(
                condition=models.Q(organization__isnull=True, kind__in=sorted(PLATFORM_ACCOUNT_KINDS))
                | (models.Q(organization__isnull=False) & ~models.Q(kind__in=sorted(PLATFORM_ACCOUNT_KINDS))),
                name="ledger_account_owner_matches_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.organization or 'platform'}:{self.kind}"


class LedgerTransaction(models.Model):
    """One movement of money: two or more entries summing to zero. Never updated or deleted (a
    trigger refuses it); a correction is a reversing transaction."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=TransactionKind.choices)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, null=True, blank=True, related_name="ledger_transactions"
    )
    memo = models.CharField(max_length=500, blank=True)
    reverses = models.OneToOneField("self", on_delete=models.PROTECT, null=True, blank=True, related_name="reversed_by")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["organization", "created_at"], name="ledger_txn_org_time_idx")]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.id.hex[:8]}"


class LedgerEntry(models.Model):
    """One leg of a transaction: a signed amount on one account, for one reservation where it concerns one."""

    transaction = models.ForeignKey(LedgerTransaction, on_delete=models.PROTECT, related_name="entries")
    account = models.ForeignKey(LedgerAccount, on_delete=models.PROTECT, related_name="entries")
    reservation = models.ForeignKey(
        Reservation, on_delete=models.PROTECT, null=True, blank=True, related_name="ledger_entries"
    )
    amount = models.DecimalField(**AMOUNT)

    class Meta:
        ordering = ["transaction", "id"]
        constraints = [models.CheckConstraint(condition=~models.Q(amount=0), name="ledger_entry_non_zero")]
        indexes = [
            # Balances are sums per account: answered from the index alone.
            models.Index(fields=["account"], include=["amount"], name="ledger_entry_account_idx"),
            models.Index(fields=["reservation", "account"], include=["amount"], name="ledger_entry_resv_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.account}: {self.amount}"


class UsageRecord(models.Model):
    """Rated usage: a reservation was active for ``period`` and was charged ``amount`` for it. A
    reservation's records never overlap (PostgreSQL refuses it), so no second is billed twice, and
    none crosses a month boundary (invoices are monthly)."""

    reservation = models.ForeignKey(Reservation, on_delete=models.PROTECT, related_name="usage_records")
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="usage_records")
    period = DateTimeRangeField(help_text="Half-open [start, end) of active time.")
    seconds = models.DecimalField(max_digits=16, decimal_places=6)
    amount = models.DecimalField(**AMOUNT)
    transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, null=True, blank=True, related_name="usage_record"
    )  # none when the price was zero
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["reservation", "period"]
        constraints = [
            ExclusionConstraint(
                name="usage_no_overlap",
                expressions=[("reservation", RangeOperators.EQUAL), ("period", RangeOperators.OVERLAPS)],
            ),
            models.CheckConstraint(condition=models.Q(seconds__gt=0), name="usage_seconds_positive"),
        ]
        indexes = [GistIndex(fields=["organization", "period"], name="usage_org_period_idx")]

    def __str__(self) -> str:
        return f"{self.reservation_id}: {self.seconds}s"


class BillingProfile(models.Model):
    """An organization's spend control: its credit line (set by operators) and, once its balance ran
    out, since when (releases follow after the grace period)."""

    organization = models.OneToOneField(Organization, on_delete=models.CASCADE, related_name="billing")
    credit_limit = models.DecimalField(
        "credit line (USD)",
        max_digits=14,
        decimal_places=2,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="How far below zero the balance may go; holds beyond it are refused.",
    )
    depleted_at = models.DateTimeField(null=True, blank=True, help_text="When the balance ran out, if it has.")

    class Meta:
        constraints = [
            models.CheckConstraint(condition=models.Q(credit_limit__gte=0), name="credit_limit_non_negative")
        ]

    def __str__(self) -> str:
        return f"billing of {self.organization}"


class SpendAlert(models.Model):
    """Tell the tenant when its spend this month reaches ``threshold`` (once a month)."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="spend_alerts")
    threshold = models.DecimalField(max_digits=14, decimal_places=2, validators=[MinValueValidator(Decimal("0.01"))])
    last_notified_month = models.DateField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["organization", "threshold"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "threshold"], name="spend_alert_unique"),
            models.CheckConstraint(condition=models.Q(threshold__gt=0), name="spend_alert_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.organization}: ${self.threshold}"


class BillingNotice(models.Model):
    """Something the tenant was told about its money (also pushed to the browser when it happened)."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="billing_notices")
    kind = models.CharField(max_length=24, choices=NoticeKind.choices)
    message = models.CharField(max_length=500)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["organization", "-created_at"], name="billing_notice_org_idx")]

    def __str__(self) -> str:
        return self.message


class InvoiceStatus(models.TextChoices):
    FINALIZED = "finalized", "Finalized"


class Invoice(models.Model):
    """A tenant's month. Written once, finalized, by the invoicing beat task; never changed afterwards
    (a trigger refuses it). The month in progress is a preview computed from usage, not a row."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="invoices")
    number = models.CharField(max_length=40, unique=True)
    month = models.DateField(help_text="First day of the month invoiced.")
    status = models.CharField(max_length=12, choices=InvoiceStatus.choices, default=InvoiceStatus.FINALIZED)
    currency = models.CharField(max_length=3, default="USD")
    total = models.DecimalField(max_digits=14, decimal_places=2)
    gpu_hours = models.DecimalField(max_digits=16, decimal_places=4)
    energy_kwh = models.DecimalField(max_digits=16, decimal_places=3)
    finalized_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["organization", "-month"]
        constraints = [models.UniqueConstraint(fields=["organization", "month"], name="invoice_one_per_month")]

    def __str__(self) -> str:
        return self.number


class InvoiceLine(models.Model):
    """One reservation's usage in the month, or one inference endpoint's: the usage of every slice
    reservation its replicas held, added up exactly and rounded once (a replica is a rental like any
    other, but the tenant rented the endpoint). Amounts are rounded to cents here and only here."""

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="lines")
    reservation = models.ForeignKey(
        Reservation, on_delete=models.PROTECT, null=True, blank=True, related_name="invoice_lines"
    )  # none on an endpoint's line
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.PROTECT, null=True, blank=True, related_name="invoice_lines"
    )  # none on a reservation's line
    description = models.CharField(max_length=300)
    seconds = models.DecimalField(max_digits=16, decimal_places=6)  # an endpoint's: replica-seconds
    gpu_count = models.PositiveIntegerField()  # an endpoint's: GPUs per replica
    gpu_hours = models.DecimalField(max_digits=16, decimal_places=4)
    price_per_gpu_hour = models.DecimalField(
        max_digits=10, decimal_places=4, null=True, blank=True
    )  # none on an endpoint's line whose replicas ran at different prices
    amount = models.DecimalField(max_digits=14, decimal_places=2)
    energy_kwh = models.DecimalField(max_digits=14, decimal_places=3)
    # An endpoint's line only: its replicas' hours and what the gateways answered for it in the month.
    replica_hours = models.DecimalField(max_digits=16, decimal_places=4, null=True, blank=True)
    requests = models.PositiveBigIntegerField(null=True, blank=True)
    input_tokens = models.PositiveBigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["invoice", "id"]
        constraints = [
            models.UniqueConstraint(fields=["invoice", "reservation"], name="invoice_line_unique"),
            models.UniqueConstraint(fields=["invoice", "endpoint"], name="invoice_line_unique_endpoint"),
            models.CheckConstraint(
                condition=(
                    models.Q(
                        reservation__isnull=False,
                        endpoint__isnull=True,
                        price_per_gpu_hour__isnull=False,
                        replica_hours__isnull=True,
                        requests__isnull=True,
                        input_tokens__isnull=True,
                    )
                    | models.Q(
                        reservation__isnull=True,
                        endpoint__isnull=False,
                        replica_hours__isnull=False,
                        requests__isnull=False,
                        input_tokens__isnull=False,
                    )
                ),
                name="invoice_line_reservation_or_endpoint",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.invoice}: {self.description}"
