"""The REST API's viewsets, one module per subdomain (tenancy, catalog, reservations, billing, endpoints),
routed in console/api_urls.py."""
