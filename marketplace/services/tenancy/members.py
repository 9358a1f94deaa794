"""Writes to tenancy: users, organizations and memberships."""

from django.db import transaction
from django.utils.text import slugify

from console.kernel.errors import Conflict, DomainError
from console.kernel.events import feeds_close_on_commit, member_group
from marketplace.choices import Role
from marketplace.models import Membership, Organization, User


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


@transaction.atomic
def organization_create(*, name: str, owner: User, slug: str | None = None) -> Organization:
    name = name.strip()
    if not name:
        raise DomainError("An organization needs a name.", fields={"name": ["This field is required."]})
    slug = slugify(slug or name)
    if not slug:
        raise DomainError("Choose a name or slug with letters or digits.", fields={"slug": ["Invalid slug."]})
    if Organization.objects.filter(slug=slug).exists():
        raise Conflict(f"An organization with slug {slug!r} already exists.", code="organization_exists")
    organization = Organization.objects.create(name=name, slug=slug)
    Membership.objects.create(organization=organization, user=owner, role=Role.OWNER)
    return organization


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
    Returns whether there was a membership to remove."""
    deleted, _ = Membership.objects.filter(organization=organization, user=user).delete()
    if deleted:
        feeds_close_on_commit(member_group(organization.pk, user.pk))
    return bool(deleted)


def organization_lock(organization_id) -> None:
    """Serialise one tenant's check-then-write (quota, balance) until the transaction ends; other
    tenants are not blocked."""
    Organization.objects.select_for_update().filter(pk=organization_id).values_list("pk", flat=True).first()
