"""The operators' admin for marketplace, one module per subdomain as the services are
(docs/conventions.md, "Where a subdomain's code lives"). Every write goes through a service
(console.kernel.admin.ServiceAdmin); importing the modules registers their admins."""

from marketplace.admin import billing, catalog, endpoints, reservations, tenancy  # noqa: F401  (registers)
