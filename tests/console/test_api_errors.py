"""Errors the framework raises before a view's own code runs (unknown paths, pages, bodies too large or
too many fields) leave in the API's one shape, are documented in its schema, and log one line."""

import json
import logging

import pytest
from django.test import Client, override_settings
from drf_spectacular.generators import SchemaGenerator

from console.kernel.errors import api_exception_handler
from marketplace.models import ApiKey
from tests.factories import PASSWORD

pytestmark = pytest.mark.django_db

TOO_BIG = 3 * 1024 * 1024  # over Django's default DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB)


def error_of(response) -> dict:
    assert response["Content-Type"].startswith("application/json"), response.content[:200]
    return response.json()["error"]


class TestUnknownPaths:
    @pytest.mark.parametrize("debug", [False, True])
    @pytest.mark.parametrize("method", ["get", "post", "delete"])
    def test_are_the_json_404_in_every_profile(self, client_for, tenant, debug, method):
        with override_settings(DEBUG=debug):
            for path in ["/api/v1/nothing/", "/api/v2/reservations/", "/api/", "/api/v1/reservations/x/y/z/"]:
                response = getattr(client_for(tenant), method)(path)
                assert response.status_code == 404, (path, response.content[:200])
                assert error_of(response) == {"code": "not_found", "message": f"Nothing at {path}."}

    @pytest.mark.parametrize("debug", [False, True])
    def test_a_path_without_its_slash_is_redirected_or_told(self, client_for, tenant, debug):
        client = client_for(tenant)
        with override_settings(DEBUG=debug):
            got = client.get("/api/v1/reservations?state=active")
            assert got.status_code == 301 and got["Location"] == "/api/v1/reservations/?state=active"
            # A POST cannot be redirected without losing its body (with DEBUG on, Django raised a 500).
            posted = client.post("/api/v1/reservations", {"offer": 1}, format="json")
            assert posted.status_code == 404
            assert error_of(posted)["message"].endswith("end with a slash: /api/v1/reservations/.")


class TestPages:
    @pytest.mark.parametrize("page", ["0", "-1", "abc", "1.5"])
    @pytest.mark.parametrize("path", ["/api/v1/reservations/", "/api/v1/offers/", "/api/v1/api-keys/"])
    def test_a_page_that_is_not_a_number_from_1_is_a_400_naming_page(self, client_for, tenant, path, page):
        response = client_for(tenant).get(path, {"page": page})
        assert response.status_code == 400
        assert error_of(response)["fields"] == {"page": ["A page number is a whole number from 1."]}

    def test_a_page_past_the_last_is_a_404_that_says_so(self, client_for, tenant):
        response = client_for(tenant).get("/api/v1/api-keys/", {"page": 2})
        assert response.status_code == 404
        assert error_of(response) == {
            "code": "not_found",
            "message": "There is no page 2: it is past the last page.",
        }
        assert client_for(tenant).get("/api/v1/api-keys/", {"page": "last"}).status_code == 200


class TestBodies:
    @pytest.mark.parametrize(
        "content_type,body",
        [
            ("application/json", json.dumps({"name": "x" * TOO_BIG})),
            ("application/x-www-form-urlencoded", "name=" + "x" * TOO_BIG),
            (
                "multipart/form-data; boundary=B",
                '--B\r\nContent-Disposition: form-data; name="name"\r\n\r\n' + "x" * TOO_BIG + "\r\n--B--\r\n",
            ),
        ],
    )
    def test_over_the_size_limit_is_a_413_logged_in_one_line(self, client_for, tenant, caplog, content_type, body):
        client = client_for(tenant)
        keys = ApiKey.objects.count()
        with caplog.at_level(logging.DEBUG):
            response = client.post("/api/v1/api-keys/", body, content_type=content_type)
        assert response.status_code == 413
        assert error_of(response) == {
            "code": "request_too_large",
            "message": "The request body is larger than the 2.5 MiB this server accepts.",
        }
        logged = [r for r in caplog.records if r.name.startswith("django") or r.name.startswith("console")]
        assert [(r.levelname, r.exc_info) for r in logged] == [("WARNING", None)], [r.getMessage() for r in logged]
        assert ApiKey.objects.count() == keys

    def test_a_portal_form_over_the_size_limit_is_a_413_page(self, tenant):
        browser = Client()
        assert browser.login(username=tenant.user.email, password=PASSWORD)
        response = browser.post("/api-keys/", {"name": "x" * TOO_BIG})
        assert response.status_code == 413 and "larger than the 2.5 MiB" in response.content.decode()
        assert response["Content-Type"].startswith("text/html")

    def test_too_many_fields_is_a_400(self, client_for, tenant):
        body = "&".join(f"f{i}=1" for i in range(1500))  # DATA_UPLOAD_MAX_NUMBER_FIELDS is 1000
        response = client_for(tenant).post("/api/v1/api-keys/", body, content_type="application/x-www-form-urlencoded")
        assert response.status_code == 400 and error_of(response)["code"] == "too_many_fields"

    def test_a_body_too_large_that_declared_no_length_is_a_413_too(self):
        # Django checks the bytes read as well: DRF's handler answers what gets past the declared length.
        from django.core.exceptions import RequestDataTooBig

        response = api_exception_handler(RequestDataTooBig("too big"), {})
        assert response.status_code == 413 and response.data["error"]["code"] == "request_too_large"


@pytest.fixture(scope="module")
def schema():
    return SchemaGenerator().get_schema(request=None, public=True)


class TestSchema:
    def test_every_paginated_list_documents_its_page_errors(self, schema):
        lists = [
            (path, operation)
            for path, item in schema["paths"].items()
            for method, operation in item.items()
            if method == "get" and any(p["name"] == "page" for p in operation.get("parameters", []))
        ]
        assert len(lists) >= 7
        for path, operation in lists:
            assert {"400", "404"} <= set(operation["responses"]), path
            page = next(p for p in operation["parameters"] if p["name"] == "page")
            assert page["schema"]["minimum"] == 1, path

    def test_every_operation_with_a_body_documents_the_framework_errors(self, schema):
        with_body = [
            (path, method, operation)
            for path, item in schema["paths"].items()
            for method, operation in item.items()
            if "requestBody" in operation
        ]
        assert len(with_body) >= 4
        for path, method, operation in with_body:
            assert {"400", "401", "413", "415"} <= set(operation["responses"]), (method, path)
            assert operation["responses"]["413"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }


def test_a_plain_client_gets_json_404_under_api_too():
    response = Client().get("/api/v1/nothing/")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
