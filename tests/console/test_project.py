"""Project-wide checks: the OpenAPI schema, migrations in step with models, health, error shape."""

import subprocess
import sys

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import Client

from marketplace.api.views import catalog as catalog_views


def test_openapi_schema_validates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))
    schema = (tmp_path / "schema.yml").read_text()
    for path in [
        "/api/v1/offers/",
        "/api/v1/sites/",
        "/api/v1/accelerator-types/",
        "/api/v1/api-keys/{id}/revoke/",
        "/api/v1/endpoints/{id}/",
        "/api/v1/models/",
    ]:
        assert f"{path}:" in schema
    assert "bearer" in schema


@pytest.mark.django_db
def test_migrations_are_in_step_with_the_models():
    result = subprocess.run(
        [sys.executable, "manage.py", "makemigrations", "--check", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=settings.BASE_DIR,
        timeout=120,
        env={**__import__("os").environ, "DJANGO_SETTINGS_MODULE": "console.settings.test"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db
def test_schema_and_docs_are_served_without_a_key():
    client = Client()
    assert client.get("/api/v1/schema/").status_code == 200
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content
    assert b"cdn" not in docs.content.lower()  # served from the sidecar package, works offline


@pytest.mark.django_db
def test_healthz_reports_both_stores():
    body = Client().get("/healthz").json()
    assert body == {"status": "ok", "postgres": "ok", "redis": "ok"}


@pytest.mark.django_db
def test_unknown_api_paths_answer_in_the_error_shape():
    response = Client().get("/api/v1/no-such-thing/")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "Nothing at /api/v1/no-such-thing/."}}


@pytest.mark.django_db
def test_unknown_portal_pages_are_a_page_not_json():
    response = Client().get("/no-such-page/")
    assert response.status_code == 404 and b"<html" in response.content


@pytest.mark.django_db
def test_an_unexpected_api_error_is_500_in_the_error_shape_without_internals(monkeypatch, tenant, client_for):
    def explode(**kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(catalog_views, "offer_list", explode)
    response = client_for(tenant).get("/api/v1/offers/")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "server_error" and "reference" in error and "secret internals" not in error["message"]


def test_docs_security_names_only_tests_that_exist():
    """docs/security.md proves each protection with a named test; a renamed or deleted test must not
    leave the page pointing at nothing."""
    import ast
    import re
    from pathlib import Path

    base = Path(settings.BASE_DIR)
    doc = (base / "docs" / "security.md").read_text()
    missing, current, cited = [], None, 0
    # `tests/x.py::Class::test`, or `::test` / `test_name` meaning another test of the file named before.
    for match in re.finditer(r"`(tests/[\w/]+\.py)(?:::([\w:]+))?`|`::(\w+)`|`(test_\w+)`", doc):
        path, chain, short, bare = match.groups()
        if path:
            current = path
            names = chain.split("::") if chain else []
        else:
            names = [short or bare]
        assert current, f"{names} is cited before any test file"
        tree = ast.parse((base / current).read_text())
        defined = {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        missing += [f"{current}::{name}" for name in names if name not in defined]
        cited += len(names)
    assert cited > 40 and not missing, missing
