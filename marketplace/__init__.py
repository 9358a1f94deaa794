"""Tenants (users, organizations, memberships, API keys) and the catalog (offers, prices); later
reservations, inference endpoints and billing. May import `provisioning`; never the reverse."""
