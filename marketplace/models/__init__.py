from .catalog import Offer, OfferTermDiscount
from .reservations import RESERVATION_TRANSITIONS, Allocation, IdempotencyRecord, Quota, Reservation
from .tenancy import ApiKey, Membership, Organization, User

__all__ = [
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
    "User",
]
