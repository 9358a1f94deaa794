from .billing import (
    BillingNotice,
    BillingProfile,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    OfferPrice,
    SpendAlert,
    UsageRecord,
)
from .catalog import Offer, OfferTermDiscount
from .reservations import (
    RESERVATION_TRANSITIONS,
    Allocation,
    IdempotencyRecord,
    Quota,
    Reservation,
    billed_interval,
)
from .tenancy import ApiKey, Membership, Organization, User

__all__ = [
    "BillingNotice",
    "BillingProfile",
    "Invoice",
    "InvoiceLine",
    "InvoiceStatus",
    "LedgerAccount",
    "LedgerEntry",
    "LedgerTransaction",
    "OfferPrice",
    "SpendAlert",
    "UsageRecord",
    "RESERVATION_TRANSITIONS",
    "Allocation",
    "ApiKey",
    "IdempotencyRecord",
    "Membership",
    "Offer",
    "OfferTermDiscount",
    "Organization",
    "Quota",
    "Reservation",
    "billed_interval",
    "User",
]
