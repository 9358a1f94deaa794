"""Idempotent POSTs (marketplace.services.idempotency, ARCHITECTURE invariant 7): the one helper the
API and the portal run a create through, with an Idempotency-Key or without one."""

import pytest

from marketplace.models import IdempotencyRecord
from marketplace.services.idempotency import idempotent

pytestmark = pytest.mark.django_db


class TestHelper:
    def test_without_a_key_the_work_runs_every_time_and_nothing_is_kept(self, tenant):
        runs = []

        def perform():
            runs.append(len(runs) + 1)
            return 201, {"run": runs[-1]}

        first = idempotent(tenant=tenant, key=None, endpoint="POST /x/", payload={"a": 1}, perform=perform)
        again = idempotent(tenant=tenant, key=None, endpoint="POST /x/", payload={"a": 1}, perform=perform)
        assert (first, again) == ((201, {"run": 1}, False), (201, {"run": 2}, False))
        assert not IdempotencyRecord.objects.exists()

    def test_with_a_key_the_work_runs_once_and_its_response_is_replayed(self, tenant):
        runs = []

        def perform():
            runs.append(len(runs) + 1)
            return 201, {"run": runs[-1]}

        first = idempotent(tenant=tenant, key="k", endpoint="POST /x/", payload={"a": 1}, perform=perform)
        again = idempotent(tenant=tenant, key="k", endpoint="POST /x/", payload={"a": 1}, perform=perform)
        assert (first, again) == ((201, {"run": 1}, False), (201, {"run": 1}, True))
        assert IdempotencyRecord.objects.count() == 1
