"""Tenant-scoped reads of tenancy: memberships, the resolved tenant, API keys."""

import uuid

from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet

from console.kernel.errors import NotFound
from marketplace.choices import weaker_role
from marketplace.models import ApiKey, Membership, Organization, SshKey, User
from marketplace.tenant_context import TenantContext


def membership_list_for_user(*, user: User) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("organization").order_by("organization__name")


def tenant_context_for_user(*, user: User, organization_id=None) -> TenantContext | None:
    """The user's tenant: the organization asked for if they belong to it, else their first one."""
    if not user.is_authenticated:
        return None
    memberships = membership_list_for_user(user=user)
    membership = None
    if organization_id:
        membership = next((m for m in memberships if str(m.organization_id) == str(organization_id)), None)
    if membership is None:
        membership = memberships.first()
    if membership is None:
        return None
    return TenantContext(organization=membership.organization, user=user, role=membership.role)


def tenant_context_for_api_key(*, key: ApiKey) -> TenantContext | None:
    """A key acts with the weaker of its role and its creator's current role; a creator who left the
    organization takes their keys' power with them."""
    membership = Membership.objects.filter(organization_id=key.organization_id, user_id=key.created_by_id).first()
    if membership is None:
        return None
    return TenantContext(
        organization=key.organization, user=key.created_by, role=weaker_role(key.role, membership.role), api_key=key
    )


def api_key_list(*, tenant: TenantContext) -> QuerySet[ApiKey]:
    """Admins and owners see every key of the organization; others see their own."""
    keys = ApiKey.objects.filter(organization=tenant.organization).select_related("created_by")
    if not tenant.is_admin:
        keys = keys.filter(created_by=tenant.user)
    return keys.order_by("-created_at")


def api_key_get(*, tenant: TenantContext, key_id) -> ApiKey:
    try:
        return api_key_list(tenant=tenant).get(pk=key_id)
    except (ApiKey.DoesNotExist, ValidationError, ValueError):
        raise NotFound("No such API key in this organization.") from None


# Operator-side lookups (management commands, admin): not tenant-scoped by design.


def organization_find(*, ref: str) -> Organization | None:
    """An organization by slug or id."""
    try:
        return Organization.objects.filter(id=uuid.UUID(ref)).first()
    except ValueError:
        return Organization.objects.filter(slug=ref).first()


def user_find(*, email: str) -> User | None:
    return User.objects.filter(email__iexact=email.strip()).first()


def ssh_key_list(*, tenant: TenantContext) -> QuerySet[SshKey]:
    """The keys a member's reservations get: their own and the organization's shared ones; admins and
    owners see every member's too."""
    keys = SshKey.objects.filter(organization=tenant.organization).select_related("owner")
    if not tenant.is_admin:
        keys = keys.filter(Q(owner=tenant.user) | Q(owner__isnull=True))
    return keys.order_by("name", "created_at")


def ssh_key_get(*, tenant: TenantContext, key_id) -> SshKey:
    try:
        return ssh_key_list(tenant=tenant).get(pk=key_id)
    except (SshKey.DoesNotExist, ValidationError, ValueError):
        raise NotFound("No such SSH key in this organization.") from None
