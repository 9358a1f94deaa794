"""The tenant as resolved once at the boundary (portal middleware, API authentication).

Everything below the boundary receives a TenantContext and reads through selectors scoped to it."""

from dataclasses import dataclass

from console.kernel.errors import Forbidden
from marketplace.choices import Role, role_rank
from marketplace.models import ApiKey, Organization, User

# Where the portal keeps the organization the user is working in (the session); the API's session
# clients and the browsers' feeds read it too.
SESSION_KEY = "organization_id"


@dataclass(frozen=True)
class TenantContext:
    organization: Organization
    user: User
    role: str
    api_key: ApiKey | None = None

    @property
    def can_spend(self) -> bool:
        return role_rank(self.role) >= role_rank(Role.MEMBER)

    @property
    def is_admin(self) -> bool:
        return role_rank(self.role) >= role_rank(Role.ADMIN)

    def require(self, minimum: str, doing: str) -> None:
        if role_rank(self.role) < role_rank(minimum):
            raise Forbidden(
                f"Your role in {self.organization.name} is {self.role}; {doing} needs {minimum} or higher.",
                required_role=str(minimum),
            )
