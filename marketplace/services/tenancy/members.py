"""Writes to tenancy: users, organizations, memberships, and the quotas operators set per tenant."""

from django.db import transaction
from django.utils.text import slugify

from console.kernel.errors import Conflict, DomainError, delete_or_refuse
from console.kernel.events import feeds_close_on_commit, member_group
from marketplace.choices import Role
from marketplace.models import Membership, Organization, Quota, User
from marketplace.services.tenancy.ssh_keys import ssh_keys_of_member_remove
from provisioning.models import AcceleratorType

MAX_QUOTA_GPUS = 2**31 - 1  # what Quota.max_gpus holds


def user_create(
    *,
    email: str,
    password: str | None = None,
    is_staff: bool = False,
    is_superuser: bool = False,
    first_name: str = "",
    last_name: str = "",
) -> User:
    email = User.objects.normalize_email(email).strip().lower()
    if User.objects.filter(email__iexact=email).exists():
        raise Conflict(f"A user with email {email} already exists.", code="user_exists")
    user = User(
        email=email,
        is_staff=is_staff or is_superuser,
        is_superuser=is_superuser,
        first_name=first_name,
        last_name=last_name,
    )
    user.set_password(password) if password else user.set_unusable_password()
    user.full_clean(exclude=["password"])
    user.save()
    return user


def _organization_name_and_slug(*, name: str, slug: str | None, organization: Organization | None = None):
    name = name.strip()
    if not name:
        raise DomainError("An organization needs a name.", fields={"name": ["This field is required."]})
    slug = slugify(slug or name)
    if not slug:
        raise DomainError("Choose a name or slug with letters or digits.", fields={"slug": ["Invalid slug."]})
    taken = Organization.objects.filter(slug=slug)
    if organization is not None:
        taken = taken.exclude(pk=organization.pk)
    if taken.exists():
        raise Conflict(f"An organization with slug {slug!r} already exists.", code="organization_exists")
    return name, slug


@transaction.atomic
def organization_create(*, name: str, owner: User | None, slug: str | None = None) -> Organization:
    """A tenant, with ``owner`` as its owner (None: an operator adds its members afterwards)."""
    name, slug = _organization_name_and_slug(name=name, slug=slug)
    organization = Organization.objects.create(name=name, slug=slug)
    if owner is not None:
        Membership.objects.create(organization=organization, user=owner, role=Role.OWNER)
    return organization


def organization_update(*, organization: Organization, name: str, slug: str) -> Organization:
    organization.name, organization.slug = _organization_name_and_slug(name=name, slug=slug, organization=organization)
    organization.save(update_fields=["name", "slug"])
    return organization


@transaction.atomic
def organization_delete(*, organization: Organization) -> None:
    """Only a tenant without history (reservations, ledger, invoices refuse it); its members' live
    feeds close once it is gone."""
    members = list(Membership.objects.filter(organization=organization).values_list("user_id", flat=True))
    delete_or_refuse(organization, noun="organization")
    for user_id in members:
        feeds_close_on_commit(member_group(organization.pk, user_id))


def membership_set(*, organization: Organization, user: User, role: str) -> Membership:
    """Add a user to an organization, or change their role."""
    membership, _ = Membership.objects.update_or_create(
        organization=organization, user=user, defaults={"role": Role(role)}
    )
    return membership


@transaction.atomic
def membership_remove(*, organization: Organization, user: User) -> bool:
    """Take a user out of an organization; their live feeds of it close once this commits (their
    API keys of it stop working by themselves: a key acts only while its creator is a member).
    Their SSH keys of it are deleted, so they leave the reservations they were let into within seconds.
    Returns whether there was a membership to remove."""
    deleted, _ = Membership.objects.filter(organization=organization, user=user).delete()
    if deleted:
        ssh_keys_of_member_remove(organization_id=organization.pk, user_id=user.pk)
        feeds_close_on_commit(member_group(organization.pk, user.pk))
    return bool(deleted)


def organization_lock(organization_id) -> None:
    """Serialise one tenant's check-then-write (quota, balance) until the transaction ends; other
    tenants are not blocked."""
    Organization.objects.select_for_update().filter(pk=organization_id).values_list("pk", flat=True).first()


@transaction.atomic
def quota_set(*, organization: Organization, accelerator_type: AcceleratorType, max_gpus: int) -> Quota:
    """The most GPUs of the type the tenant may hold at once. Reservations made from now on are checked
    against it; ones already made keep their GPUs."""
    if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or not 0 <= max_gpus <= MAX_QUOTA_GPUS:
        raise DomainError(
            f"A quota is a whole number of GPUs from 0 to {MAX_QUOTA_GPUS:,}.",
            fields={"max_gpus": [f"Enter 0 to {MAX_QUOTA_GPUS:,}."]},
        )
    organization_lock(organization.pk)  # after a reservation checking the old quota has committed
    quota, _ = Quota.objects.update_or_create(
        organization=organization, accelerator_type=accelerator_type, defaults={"max_gpus": max_gpus}
    )
    return quota


@transaction.atomic
def quota_remove(*, organization: Organization, accelerator_type: AcceleratorType) -> bool:
    """Back to the default quota (settings.DEFAULT_GPU_QUOTA). Returns whether there was one to remove."""
    organization_lock(organization.pk)
    deleted, _ = Quota.objects.filter(organization=organization, accelerator_type=accelerator_type).delete()
    return bool(deleted)
