"""The REST API's viewsets, one module per subdomain (tenancy, catalog, reservations, billing),
routed in console/api_urls.py."""
