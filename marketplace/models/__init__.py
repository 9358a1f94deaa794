from .catalog import Offer, OfferTermDiscount
from .tenancy import ApiKey, Membership, Organization, User

__all__ = ["ApiKey", "Membership", "Offer", "OfferTermDiscount", "Organization", "User"]
