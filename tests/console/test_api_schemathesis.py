"""The API keeps its own schema, whatever a tenant sends (schemathesis over /api/v1/schema/).

Every operation of the schema is called through the real Django application (WSGI, in this process,
on the test database) with generated requests, valid and invalid, as a tenant with an API key. The
tenant has an offer with nodes, a reservation, a spend alert, an endpoint and a second key, so that paths with ids
reach real rows as well as missing ones. Each response must be no server error, have a status and a
content type the schema documents for the operation, and a body of the documented shape.

Runs are bounded (a few examples per operation and mode) and derandomized: the same examples every
run, so a failure is a finding, not a flake."""

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from console.wsgi import application
from marketplace.choices import Role
from marketplace.services.billing.spend import spend_alert_create
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.lifecycle import endpoint_create
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.reservations.lifecycle import reservation_create
from marketplace.services.tenancy.api_keys import api_key_create
from tests.factories import make_offer_with_nodes, make_tenant

pytestmark = pytest.mark.django_db

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 10  # per operation and generation mode: the whole schema in about 25 s here


@pytest.fixture
def wsgi_app():
    """The WSGI application on the test's transaction: Django's own test client stops closing the
    connection at each request's end in the same way (it would end the test's transaction)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield application
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def tenant_rows(db):
    """An owner (spend alerts are for admins and owners) with a key, and rows for the paths with ids."""
    tenant = make_tenant(role=Role.OWNER)
    offer = make_offer_with_nodes(nodes=4, term_discounts={1: "10"})
    reservation = reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=None, term_months=1)
    spend_alert = spend_alert_create(tenant=tenant, threshold="100")
    offer_create(site=offer.site, accelerator_type=offer.accelerator_type, price_per_gpu_hour="1", gpus_per_instance=1)
    model = served_model_create(
        slug="embedder",
        name="Embedder",
        server_program=["serve"],
        weights="w",
        accelerator_types=[offer.accelerator_type],
    )
    endpoint = endpoint_create(tenant=tenant, name="embed", model=model, region=offer.site.region)
    victim, _ = api_key_create(tenant=tenant, name="to revoke")
    _key, plaintext = api_key_create(tenant=tenant, name="schemathesis", role=Role.OWNER)
    return {
        "authorization": f"Bearer {plaintext}",
        "ids": {
            "/api/v1/offers/{id}/": offer.pk,
            "/api/v1/offers/{id}/availability/": offer.pk,
            "/api/v1/reservations/{id}/": reservation.pk,
            "/api/v1/reservations/{id}/cancel/": reservation.pk,
            "/api/v1/reservations/{id}/extend/": reservation.pk,
            "/api/v1/reservations/{id}/telemetry/": reservation.pk,
            "/api/v1/api-keys/{id}/": victim.pk,
            "/api/v1/api-keys/{id}/revoke/": victim.pk,
            "/api/v1/spend-alerts/{id}/": spend_alert.pk,
            "/api/v1/endpoints/{id}/": endpoint.pk,
            "/api/v1/models/{slug}/": model.slug,
            "/api/v1/sites/{slug}/": offer.site.slug,
            "/api/v1/accelerator-types/{slug}/": offer.accelerator_type.slug,
        },
    }


def _strategies(operation, ids: dict):
    """Cases for an operation, in both modes; where the path names a row, half of them name ours."""
    real = ids.get(operation.path)
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        generated = operation.as_strategy(generation_mode=mode)
        if real is None:
            yield mode, generated
        else:
            name = next(iter(operation.path_parameters)).name
            yield mode, st.one_of(generated, operation.as_strategy(generation_mode=mode, path_parameters={name: real}))


def test_every_operation_conforms_to_the_schema_as_a_tenant(wsgi_app, tenant_rows):
    schema = schemathesis.openapi.from_wsgi("/api/v1/schema/", wsgi_app)
    headers = {"Authorization": tenant_rows["authorization"]}
    operations = [result.ok() for result in schema.get_all_operations()]
    # Writes that end rows (cancel, revoke, delete) last, so the reads before them see live rows.
    operations.sort(key=lambda op: op.method.upper() in ("DELETE",) or op.path.endswith(("/cancel/", "/revoke/")))
    assert len(operations) > 20
    failures = []
    for operation in operations:
        for mode, strategy in _strategies(operation, tenant_rows["ids"]):

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                run()
            except (FailureGroup, AssertionError) as error:  # collected, all reported at once below
                failures.append(f"{operation.label} ({mode.value}): {error}")
    assert not failures, "\n\n".join(failures)
