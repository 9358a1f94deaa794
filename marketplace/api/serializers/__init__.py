"""The REST API's serializers, one module per subdomain (tenancy, catalog, reservations, billing, endpoints)."""
