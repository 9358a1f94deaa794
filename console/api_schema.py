"""The OpenAPI schema generator of the API (REST_FRAMEWORK's DEFAULT_SCHEMA_CLASS).

Apart from ``console.kernel.api`` because drf-spectacular's generator imports DRF's generic views, which
import ``console.kernel.api.Pagination`` (DEFAULT_PAGINATION_CLASS) while they load."""

from drf_spectacular import openapi
from drf_spectacular.utils import OpenApiResponse

from console.kernel.api import ErrorSerializer

# Errors that DRF and Django raise before a view's own code runs, by what the operation takes.
_BODY_ERRORS = {
    400: "Invalid input, or a body that cannot be parsed.",
    413: "The request body is larger than the server accepts.",
    415: "The request body is of a media type this operation does not accept.",
}
_PAGE_ERRORS = {400: "Invalid input, or a page that is not a number from 1.", 404: "A page past the last page."}


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's schema, with the errors the framework itself answers on every operation that
    can get them, in the one error shape: a body that cannot be parsed, is too large or of a media type
    not accepted (operations that take a body); a page that is not a number or past the last (paginated
    lists). Views document their own refusals with ``error_responses``."""

    def _get_response_bodies(self, direction="response"):
        bodies = super()._get_response_bodies(direction)
        framework = {}
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            framework.update(_BODY_ERRORS)
        if self.method == "GET" and self._is_list_view() and self._get_paginator() is not None:
            framework.update(_PAGE_ERRORS)
        for code, description in framework.items():
            if str(code) not in bodies:
                bodies[str(code)] = self._get_response_for_code(
                    OpenApiResponse(ErrorSerializer, description=description), str(code), direction=direction
                )
        return bodies
