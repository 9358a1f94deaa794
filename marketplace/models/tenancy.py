import uuid

from django.contrib.auth.base_user import BaseUserManager
from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone

from marketplace.choices import Role


class UserManager(BaseUserManager):
    use_in_migrations = True

    def _create_user(self, email: str, password: str | None, **extra):
        if not email:
            raise ValueError("Users need an email address.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **extra):
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create_user(email, password, **extra)

    def create_superuser(self, email: str, password: str | None = None, **extra):
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self._create_user(email, password, **extra)


class User(AbstractUser):
    """A person. Signs in with an email address; belongs to organizations through memberships.
    Operators are staff users and act through the admin."""

    username = None
    email = models.EmailField("email address", unique=True)

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    objects = UserManager()

    class Meta:
        ordering = ["email"]
        constraints = [models.UniqueConstraint(Lower("email"), name="user_email_unique_ci")]

    def __str__(self) -> str:
        return self.email


class Organization(models.Model):
    """The tenant. Everything a tenant owns hangs off one of these and is read through selectors
    scoped to it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)
    members = models.ManyToManyField(User, through="Membership", related_name="organizations")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["organization", "user"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "user"], name="membership_unique"),
            models.CheckConstraint(condition=models.Q(role__in=Role.values), name="membership_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class ApiKey(models.Model):
    """A key for the REST API. The full key is shown once at creation; only its SHA-256 digest is
    stored. ``prefix`` is the visible, unique part used to find the row (``nck_<prefix>_<secret>``).
    A key acts with the weaker of its own role and its creator's current role in the organization; a key
    made with another key (``parent``) also expires no later than it and is revoked with it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_keys")
    created_by = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    role = models.CharField(max_length=8, choices=Role.choices, default=Role.MEMBER)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # The key this one was made with, if it was made with a key (not by a signed-in person): it never
    # outlives or outranks it, and is revoked with it (services.api_keys).
    parent = models.ForeignKey(
        "self", on_delete=models.CASCADE, null=True, blank=True, related_name="children", editable=False
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"
        constraints = [models.CheckConstraint(condition=models.Q(role__in=Role.values), name="api_key_role_valid")]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    @property
    def status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.is_expired():
            return "expired"
        return "active"


class SshKey(models.Model):
    """An OpenSSH public key a member added (``owner``), or one shared by the organization (no owner),
    installed on what its reservations run. Only the public half is ever given to the console."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="ssh_keys")
    owner = models.ForeignKey(
        User,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="ssh_keys",
        help_text="Empty: shared by the organization.",
    )
    name = models.CharField(max_length=100)
    key_type = models.CharField(max_length=32, help_text="e.g. ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa.")
    bits = models.PositiveSmallIntegerField()
    public_key = models.TextField(help_text='"<type> <base64>", as authorized_keys takes it (no comment).')
    fingerprint = models.CharField(max_length=60, help_text="SHA256:…, as ssh-keygen -l shows it.")
    created_by = models.ForeignKey(User, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "owner", "fingerprint"], name="ssh_key_once_per_owner", nulls_distinct=False
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})"
