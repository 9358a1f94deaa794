"""POST /agent/v1/enroll: a bootstrap token in, the node's own secret out (docs/agent-protocol.md)."""

import json

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from console.kernel.errors import DomainError, error_body
from provisioning.services.agents import node_enrol


@csrf_exempt  # agents authenticate with the token in the body, not a session
@require_POST
def enroll(request):
    try:
        body = json.loads(request.body or b"{}")
        if not isinstance(body, dict):
            raise ValueError
    except ValueError:
        return JsonResponse(error_body("parse_error", "The body must be a JSON object."), status=400)
    fields = {name: body.get(name) for name in ("token", "hostname")}
    missing = [name for name, value in fields.items() if not isinstance(value, str) or not value]
    if missing:
        return JsonResponse(
            error_body(
                "validation_error",
                f"{missing[0]}: this field is required.",
                fields={name: ["This field is required."] for name in missing},
            ),
            status=400,
        )
    try:
        node, secret = node_enrol(
            token=fields["token"], hostname=fields["hostname"], agent_version=str(body.get("agent_version", ""))
        )
    except DomainError as error:
        return JsonResponse(error_body(error.code, error.message), status=error.status_code)
    return JsonResponse(
        {"node": node.hostname, "secret": secret, "heartbeat_seconds": settings.AGENT_HEARTBEAT_SECONDS}
    )
