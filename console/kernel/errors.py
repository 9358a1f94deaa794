"""One error type hierarchy for the domain, and one JSON shape for every API error:

    {"error": {"code": "not_found", "message": "No offer 42.", "fields": {...}}}

`code` is stable for programs, `message` is for people, `fields` appears on validation errors.
"""

import logging
import math
import uuid

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import (
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
    ValidationError,
)
from django.db.models import ProtectedError
from django.http import Http404, HttpResponsePermanentRedirect, JsonResponse
from django.shortcuts import render
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class DomainError(Exception):
    """A refusal that the caller can understand and act on."""

    status_code = status.HTTP_400_BAD_REQUEST
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None, fields: dict | None = None, **details):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.fields = fields
        self.details = details


class NotFound(DomainError):
    status_code = status.HTTP_404_NOT_FOUND
    code = "not_found"


class Forbidden(DomainError):
    status_code = status.HTTP_403_FORBIDDEN
    code = "permission_denied"


class Conflict(DomainError):
    status_code = status.HTTP_409_CONFLICT
    code = "conflict"


def clean_or_refuse(instance, **options) -> None:
    """A model's own validation (``full_clean``: field bounds, choices, uniqueness) for a service about to
    save it, refusing in the domain's terms: a DomainError naming the fields, never Django's exception.
    ``options`` go to ``full_clean`` (``exclude``, ``validate_constraints``: for a service that refuses a
    constraint's breach in its own words, from the IntegrityError)."""
    try:
        instance.full_clean(**options)
    except ValidationError as error:
        fields = {name: [str(problem) for problem in problems] for name, problems in error.message_dict.items()}
        name, problems = next(iter(fields.items()))
        message = problems[0] if name == "__all__" else f"{name}: {problems[0]}"
        raise DomainError(message, code="validation_error", fields=fields) from None


def delete_or_refuse(instance, *, noun: str) -> None:
    """Delete a row for a service, refusing in the domain's terms (409 ``in_use``) while rows that must
    outlive it (``on_delete=PROTECT``) still name it."""
    try:
        instance.delete()
    except ProtectedError as error:
        held = sorted({str(type(row)._meta.verbose_name_plural) for row in error.protected_objects})
        raise Conflict(f"The {noun} {instance} is still referred to ({', '.join(held)}).", code="in_use") from None


def error_body(code: str, message: str, *, fields: dict | None = None, **details) -> dict:
    body = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    body.update({k: v for k, v in details.items() if v is not None})
    return {"error": body}


def _flatten(detail) -> dict | list | str:
    """DRF's nested ErrorDetail structures as plain JSON (lists of strings per field)."""
    if isinstance(detail, dict):
        return {key: _flatten(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [_flatten(item) for item in detail]
    return str(detail)


def _problems(detail, prefix: str = "") -> list[str]:
    """One field's problems as the one shape has them, a list of strings: those of a list's items or a
    nested object's keys named by where they are (``[1] Enter a valid slug.``, ``end: Required.``)."""
    if isinstance(detail, dict):
        found = []
        for key, value in detail.items():
            where = f"[{key}]" if str(key).isdigit() else f"{key}:"
            found += _problems(value, f"{prefix}{where} ")
        return found
    if isinstance(detail, list):
        return [problem for item in detail for problem in _problems(item, prefix)]
    return [f"{prefix}{detail}"]


def _first_message(fields: dict) -> str:
    for name, problems in fields.items():
        while isinstance(problems, (list, dict)) and problems:
            problems = problems[0] if isinstance(problems, list) else next(iter(problems.values()))
        if name in ("non_field_errors", "detail"):
            return str(problems)
        return f"{name}: {problems}"
    return "The request is invalid."


def _too_large_message() -> str:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return f"The request body is larger than the {limit / 1024 / 1024:g} MiB this server accepts."


def api_exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error the API returns goes through here."""
    if isinstance(exc, DomainError):
        return Response(error_body(exc.code, exc.message, fields=exc.fields, **exc.details), status=exc.status_code)
    if isinstance(exc, Http404):
        message = str(exc) if str(exc) and "No " in str(exc) else "Not found."
        return Response(error_body("not_found", message), status=404)
    if isinstance(exc, DjangoPermissionDenied):
        exc = drf_exceptions.PermissionDenied(str(exc) or None)
    # What Django raises while reading a body (a bad request, not a failure of ours): django.request
    # logs the response in one line, as it does every 4xx.
    if isinstance(exc, RequestDataTooBig):
        return Response(error_body("request_too_large", _too_large_message()), status=413)
    if isinstance(exc, (TooManyFieldsSent, TooManyFilesSent)):
        return Response(error_body("too_many_fields", str(exc)), status=400)
    if isinstance(exc, SuspiciousOperation):
        return Response(error_body("bad_request", "The request could not be understood."), status=400)
    if isinstance(exc, drf_exceptions.ValidationError):
        detail = _flatten(exc.detail)
        if isinstance(detail, dict):
            fields = {name: _problems(problems) for name, problems in detail.items()}
        else:
            fields = {"non_field_errors": _problems(detail)}
        return Response(error_body("validation_error", _first_message(fields), fields=fields), status=400)
    if isinstance(exc, drf_exceptions.APIException):
        headers = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if isinstance(exc, drf_exceptions.Throttled):  # whole seconds, at least one (RFC 9110)
            headers["Retry-After"] = str(max(1, math.ceil(exc.wait or 1)))
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else exc.default_code
        return Response(error_body(code, str(_flatten(exc.detail))), status=exc.status_code, headers=headers)
    reference = uuid.uuid4().hex[:12]
    logger.exception("Unhandled API error (reference %s)", reference)
    return Response(
        error_body("server_error", f"Something went wrong on our side (reference {reference}).", reference=reference),
        status=500,
    )


def _wants_json(request) -> bool:
    return request.path.startswith("/api/") or "application/json" in request.headers.get("Accept", "")


class DomainErrorMiddleware:
    """Answers a DomainError raised outside DRF (portal views) with its status: JSON for API
    clients, the error page for people."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exc):
        if not isinstance(exc, DomainError):
            return None
        if _wants_json(request):
            return JsonResponse(error_body(exc.code, exc.message, fields=exc.fields), status=exc.status_code)
        return render(
            request, "error.html", {"status": exc.status_code, "message": exc.message}, status=exc.status_code
        )


class RequestSizeMiddleware:
    """Refuses a body declared larger than DATA_UPLOAD_MAX_MEMORY_SIZE with 413 before anything reads
    it: otherwise Django raises RequestDataTooBig wherever the body is first read (CSRF, a form, a
    parser), an ERROR with a traceback for each such request. Nothing here takes file uploads, so the
    limit holds for the whole body. A body of undeclared length still meets Django's own check."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and length > limit:
            return _page_or_json(request, 413, "request_too_large", _too_large_message())
        return self.get_response(request)


def _page_or_json(request, status_code: int, code: str, message: str):
    if _wants_json(request):
        return JsonResponse(error_body(code, message), status=status_code)
    return render(request, "error.html", {"status": status_code, "message": message}, status=status_code)


def handler400(request, exception=None):
    return _page_or_json(request, 400, "bad_request", "The request could not be understood.")


def handler403(request, exception=None):
    return _page_or_json(request, 403, "permission_denied", "You do not have permission to do that.")


def handler404(request, exception=None):
    return _page_or_json(request, 404, "not_found", f"Nothing at {request.path}.")


@csrf_exempt  # it changes nothing; a POST to a wrong path is told so, not asked for a CSRF token
def api_not_found(request, *args, **kwargs):
    """Any path under /api/ that names nothing: the API's 404 in its one shape, in every profile (with
    DEBUG on, Django would answer its technical HTML page instead of handler404). A GET without the
    trailing slash of a path that has one is redirected, as APPEND_SLASH does for the rest of the site."""
    slashed = request.path_info + "/"
    hint = ""
    if not request.path_info.endswith("/"):
        try:
            match = resolve(slashed)
        except Resolver404:
            match = None
        if match is not None and match.func is not api_not_found:
            if request.method in ("GET", "HEAD"):
                return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))
            hint = f" Paths of this API end with a slash: {request.path}/."
    return JsonResponse(error_body("not_found", f"Nothing at {request.path}.{hint}"), status=404)


def handler500(request):
    return _page_or_json(request, 500, "server_error", "Something went wrong on our side.")
