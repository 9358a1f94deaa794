"""What a real daphne answers to bodies the application must judge: Twisted under daphne used to parse
multipart bodies itself and answer a malformed one with a bare 400 (no body, no content type, nothing
logged) before the application saw it; a body over the size limit is a 413 in the error shape."""

import http.client

import pytest

from marketplace.choices import Role
from marketplace.services.tenancy.api_keys import api_key_create
from tests.factories import make_tenant

pytestmark = [pytest.mark.slow]


def post(stack, path: str, body: bytes, content_type: str, key: str) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        connection.request(
            "POST", path, body=body, headers={"Content-Type": content_type, "Authorization": f"Bearer {key}"}
        )
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def test_daphne_lets_the_api_answer_malformed_multipart_and_oversized_bodies(stack):
    owner = make_tenant(role=Role.OWNER)
    _key, key = api_key_create(tenant=owner, name="e2e", role=Role.OWNER)
    stack.start_daphne()
    multipart = "multipart/form-data; boundary=xx"
    for path in ["/api/v1/api-keys/", "/api/v1/spend-alerts/"]:
        for body in [b"garbage", b"--xx--\r\n"]:
            status, content_type, text = post(stack, path, body, multipart, key)
            assert status == 400 and content_type == "application/json", (path, body, status, content_type, text)
            assert b'"validation_error"' in text
    status, content_type, text = post(stack, "/api/v1/api-keys/", b"x" * (3 * 1024 * 1024), "application/json", key)
    assert status == 413 and content_type == "application/json" and b'"request_too_large"' in text
    assert "Traceback" not in stack.log("daphne")
