"""`Authorization: Bearer <api key>` for the REST API."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from marketplace.services.tenancy.api_keys import InvalidApiKey, api_key_authenticate


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme.lower() != self.keyword.lower():
            return None
        if not raw_key.strip():
            raise exceptions.AuthenticationFailed("The Authorization header has no key after Bearer.")
        try:
            key = api_key_authenticate(raw_key=raw_key)
        except InvalidApiKey:
            raise exceptions.AuthenticationFailed("The API key is invalid, expired or revoked.") from None
        return key.created_by, key

    def authenticate_header(self, request):
        return f'{self.keyword} realm="api"'


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.api.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from the portal or `manage.py create_api_key`, e.g. `nck_1a2b3c4d_…`.",
        }
