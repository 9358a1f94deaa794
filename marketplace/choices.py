from django.db import models


class Role(models.TextChoices):
    """Membership roles, strongest first. Viewers read; members and up spend; admins and owners
    manage the organization's members and every API key."""

    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


def role_rank(role: str) -> int:
    return ROLE_RANK[Role(role)]


def weaker_role(a: str, b: str) -> str:
    return a if role_rank(a) <= role_rank(b) else b


class OfferShape(models.TextChoices):
    NODE = "node", "Node"
    RACK = "rack", "Whole rack"


class OfferKind(models.TextChoices):
    """What one instance of an offer is, in plain words (``Offer.kind``): some GPUs of a node, a whole
    node, or a whole rack. Derived from the shape and the sizes, never stored."""

    SLICE = "slice", "Slice of a node"
    NODE = "node", "Whole node"
    RACK = "rack", "Whole rack"


class TermMonths(models.IntegerChoices):
    ONE = 1, "1 month"
    THREE = 3, "3 months"
    SIX = 6, "6 months"
    TWELVE = 12, "12 months"


class ReservationState(models.TextChoices):
    PENDING = "pending", "Pending"
    PROVISIONING = "provisioning", "Provisioning"
    ACTIVE = "active", "Active"
    RELEASING = "releasing", "Releasing"
    COMPLETED = "completed", "Completed"
    CANCELLED = "cancelled", "Cancelled"
    FAILED = "failed", "Failed"


# Reservations in these states hold their nodes (their allocations are live).
HOLDING_STATES = frozenset(
    {ReservationState.PENDING, ReservationState.PROVISIONING, ReservationState.ACTIVE, ReservationState.RELEASING}
)
# Reservations in these states have left active (or never will be): rated once more, to their end, then
# settled (marketplace.services.billing.metering).
SETTLING_STATES = (
    ReservationState.RELEASING,
    ReservationState.COMPLETED,
    ReservationState.CANCELLED,
    ReservationState.FAILED,
)

# Reservations in these states are over: nothing more happens to them, their bill is what was rated.
FINISHED_STATES = frozenset({ReservationState.COMPLETED, ReservationState.CANCELLED, ReservationState.FAILED})


class AccountKind(models.TextChoices):
    """Ledger accounts. A tenant has credits, holds and usage; the platform has grants. Amounts are
    signed so that every transaction's legs sum to zero (ARCHITECTURE invariant 4)."""

    CREDITS = "credits", "Credits"  # tenant: prepaid money, neither spent nor held
    HOLDS = "holds", "Holds"  # tenant: money set aside for reservations' expected cost
    USAGE = "usage", "Usage"  # tenant: money spent on rated usage (platform revenue)
    GRANTS = "grants", "Grants"  # platform: credits operators granted (minus their sum)


TENANT_ACCOUNT_KINDS = frozenset({AccountKind.CREDITS, AccountKind.HOLDS, AccountKind.USAGE})
PLATFORM_ACCOUNT_KINDS = frozenset({AccountKind.GRANTS})


class TransactionKind(models.TextChoices):
    GRANT = "grant", "Credit grant"
    HOLD = "hold", "Hold"
    HOLD_RELEASE = "hold_release", "Hold release"
    USAGE = "usage", "Usage"
    REVERSAL = "reversal", "Reversal"


class NoticeKind(models.TextChoices):
    SPEND_ALERT = "spend_alert", "Spend alert"
    BALANCE_DEPLETED = "balance_depleted", "Balance ran out"
    BALANCE_RESTORED = "balance_restored", "Balance restored"
    RELEASED_UNPAID = "released_unpaid", "Released: balance ran out"
    CREDITS_GRANTED = "credits_granted", "Credits granted"


class ReplicaState(models.TextChoices):
    STARTING = "starting", "Starting"  # its slice is being placed and its server started
    READY = "ready", "Ready"  # the agent reported its address and its health route answers
    UNHEALTHY = "unhealthy", "Unhealthy"  # it stopped answering: being replaced
    DRAINING = "draining", "Draining"  # chosen for removal: no new requests, those in flight finish
    STOPPING = "stopping", "Stopping"  # its slice is being released
    STOPPED = "stopped", "Stopped"


LIVE_REPLICA_STATES = frozenset({ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY})


class AccessStatus(models.TextChoices):
    """Whether a reservation can be logged into (marketplace.selectors.access)."""

    NONE = "none", "No SSH access"  # an endpoint's replica
    WAITING = "waiting", "Not set up yet"
    READY = "ready", "Ready"
    ENDED = "ended", "Ended"
