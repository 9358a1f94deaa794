import asyncio
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from console.celery import app as celery_app
from console.kernel.events import tenant_group
from console.kernel.lifecycle import IllegalTransition
from marketplace.choices import OfferShape, ReservationState, Role
from marketplace.models import Allocation, IdempotencyRecord, Quota, Reservation
from marketplace.selectors.capacity import earliest_fit
from marketplace.services.idempotency import idempotency_records_expire
from marketplace.services.reservations.lifecycle import (
    reservation_cancel,
    reservation_create,
    reservations_advance,
)
from provisioning.services.fleet import node_transition
from tests.factories import OfferFactory, RackFactory, SiteFactory, make_node, make_tenant

pytestmark = pytest.mark.django_db
S = ReservationState


@pytest.fixture
def fleet():
    """One site: rack A with 3 nodes, rack B with 2; a node offer and a rack offer of the same type."""
    site = SiteFactory(slug="fra")
    node_offer = OfferFactory(site=site, price_per_gpu_hour=Decimal("2.50"), max_duration_hours=48)
    rack_offer = OfferFactory(site=site, accelerator_type=node_offer.accelerator_type, shape=OfferShape.RACK)
    rack_a, rack_b = RackFactory(site=site, name="a"), RackFactory(site=site, name="b")
    nodes = {
        "a": [make_node(rack=rack_a, accelerator=node_offer.accelerator_type) for _ in range(3)],
        "b": [make_node(rack=rack_b, accelerator=node_offer.accelerator_type) for _ in range(2)],
    }
    return {
        "site": site,
        "node_offer": node_offer,
        "rack_offer": rack_offer,
        "racks": {"a": rack_a, "b": rack_b},
        "nodes": nodes,
    }


def hours_from_now(hours: float):
    return timezone.now() + timedelta(hours=hours)


def post(client, body, **headers):
    return client.post("/api/v1/reservations/", body, format="json", **headers)


class TestCreate:
    def test_reserve_now_for_a_duration(self, tenant, client_for, fleet):
        response = post(client_for(tenant), {"offer": fleet["node_offer"].id, "quantity": 2, "duration_hours": 3})
        assert response.status_code == 201, response.content
        body = response.json()
        assert body["state"] == "pending" and body["node_count"] == 2 and body["gpu_count"] == 16
        start, end = parse_datetime(body["start"]), parse_datetime(body["end"])
        assert abs((start - timezone.now()).total_seconds()) < 5 and end - start == timedelta(hours=3)
        assert body["price"] == {
            "currency": "USD",
            "per_gpu_hour": "2.5000",
            "instances": 2,
            "gpus_per_instance": 8,
            "per_instance_hour": "20.0000",
            "gpu_count": 16,
            "hours": "3.0000",
            "estimated_total": "120.00",
        }
        assert len(body["allocations"]) == 2 and body["created_by"] == tenant.user.email

    def test_the_price_is_kept_when_the_offer_changes(self, tenant, fleet):
        offer = fleet["node_offer"]
        reservation = reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=hours_from_now(1))
        offer.price_per_gpu_hour = Decimal("9.99")
        offer.save()
        reservation.refresh_from_db()
        assert reservation.price_per_gpu_hour == Decimal("2.5000")

    def test_placement_prefers_the_best_fitting_single_rack(self, tenant, fleet):
        offer, end = fleet["node_offer"], hours_from_now(2)
        two = reservation_create(tenant=tenant, offer=offer, quantity=2, start=None, end=end)
        assert set(two.allocations.values_list("node__rack__name", flat=True)) == {"b"}  # B fits exactly
        three = reservation_create(tenant=tenant, offer=offer, quantity=3, start=None, end=end)
        assert set(three.allocations.values_list("node__rack__name", flat=True)) == {"a"}

    def test_a_request_larger_than_any_rack_spans_racks_of_one_site(self, tenant, fleet):
        four = reservation_create(
            tenant=tenant, offer=fleet["node_offer"], quantity=4, start=None, end=hours_from_now(2)
        )
        racks = list(four.allocations.values_list("node__rack__name", flat=True))
        assert sorted(racks) == ["a", "a", "a", "b"]  # the fewest racks: all of A, then one of B

    def test_a_rack_reservation_holds_every_node_of_one_rack(self, tenant, client_for, fleet):
        response = post(client_for(tenant), {"offer": fleet["rack_offer"].id, "duration_hours": 1})
        assert response.status_code == 201, response.content
        body = response.json()
        rack = fleet["racks"][body["rack"]]
        assert {a["node"] for a in body["allocations"]} == set(rack.nodes.values_list("hostname", flat=True))

    def test_nodes_that_cannot_take_work_are_not_placed(self, tenant, fleet):
        for node in fleet["nodes"]["a"]:
            node_transition(node=node, target="draining")
        reservation = reservation_create(
            tenant=tenant, offer=fleet["node_offer"], quantity=2, start=None, end=hours_from_now(1)
        )
        assert set(reservation.allocations.values_list("node__rack__name", flat=True)) == {"b"}
        response_error = None
        try:
            reservation_create(tenant=tenant, offer=fleet["node_offer"], quantity=1, start=None, end=hours_from_now(1))
        except Exception as error:  # noqa: BLE001
            response_error = error
        assert response_error is not None and response_error.code == "capacity_unavailable"


class TestRefusals:
    def test_no_capacity_is_409_with_what_is_free_and_the_earliest_window(
        self, tenant, other_tenant, client_for, fleet
    ):
        start = hours_from_now(1).replace(microsecond=0)
        reservation_create(
            tenant=other_tenant, offer=fleet["node_offer"], quantity=4, start=start, end=start + timedelta(hours=2)
        )
        before = Reservation.objects.count()
        response = post(
            client_for(tenant),
            {"offer": fleet["node_offer"].id, "quantity": 3, "start": start.isoformat(), "duration_hours": 1},
        )
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "capacity_unavailable" and error["available_nodes"] == 1
        assert parse_datetime(error["earliest_start"]) == start + timedelta(hours=2)
        assert "earliest window" in error["message"]
        assert Reservation.objects.count() == before

    @pytest.mark.parametrize(
        "body,field",
        [
            ({"quantity": 1, "duration_hours": 1}, "offer"),
            ({"offer": 999999, "duration_hours": 1}, "offer"),
            ({"OFFER": 0, "quantity": 0, "duration_hours": 1}, "quantity"),
            ({"OFFER": 0, "quantity": -2, "duration_hours": 1}, "quantity"),
            ({"OFFER": 0, "quantity": "many", "duration_hours": 1}, "quantity"),
            ({"OFFER": 0, "duration_hours": 0}, "duration_hours"),
            ({"OFFER": 0}, "end"),
            ({"OFFER": 0, "duration_hours": 1, "end": "2030-01-01T00:00:00Z"}, "end"),
            ({"OFFER": 0, "start": "START+2h", "end": "START+1h"}, "end"),
            ({"OFFER": 0, "start": "START+2h", "end": "START+2h"}, "end"),
            ({"OFFER": 0, "start": "START-10m", "duration_hours": 1}, "start"),
            ({"OFFER": 0, "start": "START+9000h", "duration_hours": 1}, "start"),
            ({"OFFER": 0, "duration_hours": 49}, "duration_hours"),  # the field sent, not the end computed
            ({"OFFER": 0, "start": "yesterday-ish", "duration_hours": 1}, "start"),
            ({"RACK": 0, "quantity": 2, "duration_hours": 1}, "quantity"),
        ],
    )
    def test_bad_requests_are_400_and_write_nothing(self, tenant, client_for, fleet, body, field):
        body = dict(body)
        if "OFFER" in body:
            body["offer"] = fleet["node_offer"].id
            del body["OFFER"]
        if "RACK" in body:
            body["offer"] = fleet["rack_offer"].id
            del body["RACK"]
        now = timezone.now()
        for name in ("start", "end"):
            value = body.get(name, "")
            if isinstance(value, str) and value.startswith("START"):
                offset = value[5:]
                delta = (
                    timedelta(hours=int(offset[1:-1])) if offset.endswith("h") else timedelta(minutes=int(offset[1:-1]))
                )
                body[name] = (now + (delta if offset[0] == "+" else -delta)).isoformat()
        response = post(client_for(tenant), body)
        assert response.status_code == 400, response.content
        error = response.json()["error"]
        assert field in error["fields"] and error["message"]
        assert not Reservation.objects.exists() and not Allocation.objects.exists()

    def test_an_inactive_offer_is_refused(self, tenant, client_for, fleet):
        fleet["node_offer"].is_active = False
        fleet["node_offer"].save()
        response = post(client_for(tenant), {"offer": fleet["node_offer"].id, "duration_hours": 1})
        assert response.status_code == 400 and "offer" in response.json()["error"]["fields"]

    def test_viewers_cannot_reserve(self, client_for, fleet):
        viewer = make_tenant(role=Role.VIEWER)
        response = post(client_for(viewer), {"offer": fleet["node_offer"].id, "duration_hours": 1})
        assert response.status_code == 403
        assert "viewer" in response.json()["error"]["message"]
        assert not Reservation.objects.exists()

    def test_a_viewer_key_of_an_owner_cannot_reserve(self, client_for, fleet):
        owner = make_tenant(role=Role.OWNER)
        response = post(client_for(owner, role=Role.VIEWER), {"offer": fleet["node_offer"].id, "duration_hours": 1})
        assert response.status_code == 403


class TestIdempotency:
    def test_the_same_key_twice_gives_one_reservation_and_the_same_response(self, tenant, client_for, fleet):
        client = client_for(tenant)
        body = {"offer": fleet["node_offer"].id, "quantity": 1, "duration_hours": 2}
        first = post(client, body, HTTP_IDEMPOTENCY_KEY="order-42")
        again = post(client, body, HTTP_IDEMPOTENCY_KEY="order-42")
        assert first.status_code == again.status_code == 201
        assert first.json() == again.json() and again["Idempotent-Replayed"] == "true"
        assert Reservation.objects.count() == 1

    def test_the_same_key_with_another_body_is_refused(self, tenant, client_for, fleet):
        client = client_for(tenant)
        post(client, {"offer": fleet["node_offer"].id, "quantity": 1, "duration_hours": 2}, HTTP_IDEMPOTENCY_KEY="k")
        response = post(
            client, {"offer": fleet["node_offer"].id, "quantity": 2, "duration_hours": 2}, HTTP_IDEMPOTENCY_KEY="k"
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "idempotency_key_reused"
        assert Reservation.objects.count() == 1

    def test_keys_belong_to_their_tenant(self, tenant, other_tenant, client_for, fleet):
        body = {"offer": fleet["node_offer"].id, "quantity": 1, "duration_hours": 2}
        assert post(client_for(tenant), body, HTTP_IDEMPOTENCY_KEY="shared").status_code == 201
        assert post(client_for(other_tenant), body, HTTP_IDEMPOTENCY_KEY="shared").status_code == 201
        assert Reservation.objects.count() == 2

    def test_a_refused_request_can_be_retried_with_its_key(self, tenant, client_for, fleet):
        client = client_for(tenant)
        body = {"offer": fleet["node_offer"].id, "quantity": 9, "duration_hours": 2}
        assert post(client, body, HTTP_IDEMPOTENCY_KEY="retry-me").status_code == 409
        assert not IdempotencyRecord.objects.exists()

    @pytest.mark.django_db(transaction=True)
    def test_concurrent_requests_with_one_key_make_one_reservation(self, tenant, client_for, fleet):
        body = {"offer": fleet["node_offer"].id, "quantity": 1, "duration_hours": 2}
        clients = [client_for(tenant) for _ in range(8)]
        barrier = threading.Barrier(len(clients))
        responses = []

        def send(client):
            barrier.wait()
            responses.append(post(client, body, HTTP_IDEMPOTENCY_KEY="burst"))
            connection.close()

        threads = [threading.Thread(target=send, args=(c,)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [r.status_code for r in responses] == [201] * 8, [r.content for r in responses]
        assert len({r.json()["id"] for r in responses}) == 1
        assert Reservation.objects.count() == 1

    def test_a_key_reused_after_its_record_expired_is_a_clear_422_and_makes_nothing(self, tenant, client_for, fleet):
        client = client_for(tenant)
        body = {"offer": fleet["node_offer"].id, "quantity": 1, "duration_hours": 2}
        assert post(client, body, HTTP_IDEMPOTENCY_KEY="yesterday").status_code == 201
        IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(days=2))
        assert idempotency_records_expire() == 1
        # The reservation still holds the key (unique per organization); its first response is gone.
        for again in (body, {**body, "quantity": 2}):
            response = post(client, again, HTTP_IDEMPOTENCY_KEY="yesterday")
            assert response.status_code == 422, response.content
            error = response.json()["error"]
            assert error["code"] == "idempotency_key_reused" and "use a new key" in error["message"]
        assert Reservation.objects.count() == 1 and not IdempotencyRecord.objects.exists()
        assert post(client, body, HTTP_IDEMPOTENCY_KEY="today").status_code == 201

    def test_an_unusable_key_is_400(self, tenant, client_for, fleet):
        response = post(
            client_for(tenant), {"offer": fleet["node_offer"].id, "duration_hours": 1}, HTTP_IDEMPOTENCY_KEY="x" * 300
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_idempotency_key"


class TestCancelAndExtend:
    def test_cancel_before_start_frees_the_nodes(self, tenant, client_for, fleet):
        client = client_for(tenant)
        start = hours_from_now(2)
        body = {"offer": fleet["node_offer"].id, "quantity": 5, "start": start.isoformat(), "duration_hours": 1}
        reservation = post(client, body).json()
        cancelled = client.post(f"/api/v1/reservations/{reservation['id']}/cancel/")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert not Allocation.objects.filter(live=True).exists()
        assert post(client, body).status_code == 201  # the same five nodes again

    def test_cancel_after_start_releases(self, tenant, client_for, fleet):
        client = client_for(tenant)
        reservation = post(client, {"offer": fleet["node_offer"].id, "duration_hours": 1}).json()
        reservations_advance()  # started: provisioning
        assert Reservation.objects.get(pk=reservation["id"]).state == S.PROVISIONING
        response = client.post(f"/api/v1/reservations/{reservation['id']}/cancel/")
        assert response.status_code == 200 and response.json()["state"] == "releasing"
        again = client.post(f"/api/v1/reservations/{reservation['id']}/cancel/")
        assert again.status_code == 409 and again.json()["error"]["code"] == "illegal_transition"

    def test_extend_while_the_nodes_stay_free(self, tenant, other_tenant, client_for, fleet):
        client = client_for(tenant)
        start = hours_from_now(1)
        mine = post(
            client, {"offer": fleet["node_offer"].id, "quantity": 5, "start": start.isoformat(), "duration_hours": 2}
        ).json()
        new_end = start + timedelta(hours=4)
        extended = client.post(
            f"/api/v1/reservations/{mine['id']}/extend/", {"end": new_end.isoformat()}, format="json"
        )
        assert extended.status_code == 200, extended.content
        assert parse_datetime(extended.json()["end"]) == new_end
        assert all(parse_datetime(a["end"]) == new_end for a in extended.json()["allocations"])
        # Someone else books the nodes right after; extending into them is refused.
        reservation_create(
            tenant=other_tenant, offer=fleet["node_offer"], quantity=1, start=new_end, end=new_end + timedelta(hours=1)
        )
        refused = client.post(
            f"/api/v1/reservations/{mine['id']}/extend/",
            {"end": (new_end + timedelta(hours=2)).isoformat()},
            format="json",
        )
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "capacity_unavailable"
        assert parse_datetime(client.get(f"/api/v1/reservations/{mine['id']}/").json()["end"]) == new_end

    def test_extend_must_move_the_end_later_within_the_offers_limit(self, tenant, client_for, fleet):
        client = client_for(tenant)
        mine = post(client, {"offer": fleet["node_offer"].id, "duration_hours": 2}).json()
        for end in [mine["start"], (timezone.now() + timedelta(hours=49)).isoformat(), "soon"]:
            response = client.post(f"/api/v1/reservations/{mine['id']}/extend/", {"end": end}, format="json")
            assert response.status_code == 400, (end, response.content)
            assert "end" in response.json()["error"]["fields"]

    def test_extend_by_hours_like_create_takes_them(self, tenant, client_for, fleet):
        client = client_for(tenant)
        mine = post(client, {"offer": fleet["node_offer"].id, "duration_hours": 2}).json()
        extended = client.post(f"/api/v1/reservations/{mine['id']}/extend/", {"duration_hours": "1.5"}, format="json")
        assert extended.status_code == 200, extended.content
        assert parse_datetime(extended.json()["end"]) == parse_datetime(mine["end"]) + timedelta(hours=1.5)
        assert extended.json()["price"]["hours"] == "3.5000"

    @pytest.mark.parametrize(
        "body,field,words",
        [
            ({"duration_hours": "47"}, "duration_hours", "at most 48 hours"),  # 2 + 47 > the offer's 48
            ({"duration_hours": "99999999999"}, "duration_hours", "At most 43,920 hours."),
            ({"duration_hours": "0.001"}, "duration_hours", "At least 0.02 hours."),
            ({"duration_hours": "-3"}, "duration_hours", "At least 0.02 hours."),
            ({"duration_hours": "NaN"}, "duration_hours", "A number of hours"),
            ({"duration_hours": "1", "end": "2031-01-01T00:00:00Z"}, "end", "either a new end or the hours"),
            ({}, "end", "either a new end or the hours"),
        ],
    )
    def test_extend_refusals_speak_hours_and_change_nothing(self, tenant, client_for, fleet, body, field, words):
        client = client_for(tenant)
        mine = post(client, {"offer": fleet["node_offer"].id, "duration_hours": 2}).json()
        response = client.post(f"/api/v1/reservations/{mine['id']}/extend/", body, format="json")
        assert response.status_code == 400, response.content
        error = response.json()["error"]
        assert words in error["fields"][field][0] and "digits" not in response.content.decode()
        assert client.get(f"/api/v1/reservations/{mine['id']}/").json()["end"] == mine["end"]

    @pytest.mark.parametrize(
        "hours,words",
        [
            ("49", "This offer allows at most 48 hours per reservation."),
            ("123456789", "At most 43,920 hours."),
            ("1" * 40, "At most 43,920 hours."),
            ("1e999999", "At most 43,920 hours."),
            ("0.005", "At least 0.02 hours."),
        ],
    )
    def test_create_refusals_speak_hours_not_digits(self, tenant, client_for, fleet, hours, words):
        response = post(client_for(tenant), {"offer": fleet["node_offer"].id, "duration_hours": hours})
        assert response.status_code == 400, response.content
        assert response.json()["error"]["fields"]["duration_hours"] == [words]
        assert not Reservation.objects.exists()

    def test_a_finished_reservation_cannot_be_cancelled(self, tenant, fleet):
        reservation = reservation_create(
            tenant=tenant, offer=fleet["node_offer"], quantity=1, start=None, end=hours_from_now(1)
        )
        reservation_cancel(tenant=tenant, reservation=reservation)
        with pytest.raises(IllegalTransition):
            reservation_cancel(tenant=tenant, reservation=reservation)


class TestQuotas:
    def test_the_default_quota_applies_without_a_row(self, tenant, client_for, fleet, settings):
        settings.DEFAULT_GPU_QUOTA = 16
        client = client_for(tenant)
        assert post(client, {"offer": fleet["node_offer"].id, "quantity": 2, "duration_hours": 1}).status_code == 201
        refused = post(client, {"offer": fleet["node_offer"].id, "quantity": 1, "duration_hours": 1})
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "quota_exceeded" and error["quota"] == 16 and error["in_use"] == 16

    def test_an_operator_quota_overrides_and_only_overlapping_time_counts(self, tenant, fleet):
        Quota.objects.create(
            organization=tenant.organization, accelerator_type=fleet["node_offer"].accelerator_type, max_gpus=8
        )
        offer = fleet["node_offer"]
        start = hours_from_now(1)
        reservation_create(tenant=tenant, offer=offer, quantity=1, start=start, end=start + timedelta(hours=1))
        later = reservation_create(
            tenant=tenant, offer=offer, quantity=1, start=start + timedelta(hours=1), end=start + timedelta(hours=2)
        )
        assert later.state == S.PENDING
        with pytest.raises(Exception, match="may hold 8"):
            reservation_create(
                tenant=tenant,
                offer=offer,
                quantity=1,
                start=start + timedelta(minutes=30),
                end=start + timedelta(minutes=90),
            )

    def test_other_tenants_do_not_use_my_quota(self, tenant, other_tenant, fleet, settings):
        settings.DEFAULT_GPU_QUOTA = 16
        reservation_create(
            tenant=other_tenant, offer=fleet["node_offer"], quantity=2, start=None, end=hours_from_now(1)
        )
        mine = reservation_create(
            tenant=tenant, offer=fleet["node_offer"], quantity=2, start=None, end=hours_from_now(1)
        )
        assert mine.gpu_count == 16


class TestReads:
    def test_list_filters_by_state_and_detail_shows_allocations(self, tenant, client_for, fleet):
        client = client_for(tenant)
        keep = post(client, {"offer": fleet["node_offer"].id, "duration_hours": 1}).json()
        drop = post(
            client, {"offer": fleet["node_offer"].id, "start": hours_from_now(3).isoformat(), "duration_hours": 1}
        ).json()
        client.post(f"/api/v1/reservations/{drop['id']}/cancel/")
        states = {r["id"]: r["state"] for r in client.get("/api/v1/reservations/").json()["results"]}
        assert states == {keep["id"]: "pending", drop["id"]: "cancelled"}
        cancelled = client.get("/api/v1/reservations/?state=cancelled").json()["results"]
        assert [r["id"] for r in cancelled] == [drop["id"]]
        assert client.get("/api/v1/reservations/?state=sideways").status_code == 400
        detail = client.get(f"/api/v1/reservations/{keep['id']}/").json()
        assert detail["allocations"][0]["site"] == "fra"

    def test_another_tenants_reservation_is_404_everywhere(self, tenant, other_tenant, client_for, fleet):
        theirs = reservation_create(
            tenant=other_tenant, offer=fleet["node_offer"], quantity=1, start=None, end=hours_from_now(1)
        )
        client = client_for(tenant)
        assert client.get(f"/api/v1/reservations/{theirs.id}/").status_code == 404
        assert client.post(f"/api/v1/reservations/{theirs.id}/cancel/").status_code == 404
        assert (
            client.post(
                f"/api/v1/reservations/{theirs.id}/extend/", {"end": hours_from_now(5).isoformat()}, format="json"
            ).status_code
            == 404
        )
        assert client.get("/api/v1/reservations/").json()["count"] == 0
        theirs.refresh_from_db()
        assert theirs.state == S.PENDING


@pytest.fixture
def slices(fleet):
    """Offers of 1-, 2- and 4-GPU instances over the fleet's 8-GPU nodes, next to its whole nodes."""
    node_offer = fleet["node_offer"]
    return {
        size: OfferFactory(
            site=fleet["site"],
            accelerator_type=node_offer.accelerator_type,
            gpus_per_instance=size,
            price_per_gpu_hour=Decimal("2.50"),
        )
        for size in (1, 2, 4)
    }


class TestSlices:
    def test_a_slice_reservation_shows_which_gpus_of_which_node_it_holds(self, tenant, client_for, fleet, slices):
        client = client_for(tenant)
        pair = post(client, {"offer": slices[2].id, "duration_hours": 2})
        single = post(client, {"offer": slices[1].id, "duration_hours": 2})
        assert pair.status_code == single.status_code == 201, (pair.content, single.content)
        pair, single = pair.json(), single.json()
        assert pair["offer"]["kind"] == "slice" and pair["offer"]["gpus_per_instance"] == 2
        assert (pair["quantity"], pair["node_count"], pair["gpu_count"]) == (1, 1, 2)
        # Both on one node (the fullest with room), on GPUs that do not overlap, each aligned to its size.
        [held_pair], [held_single] = pair["allocations"], single["allocations"]
        assert held_pair["node"] == held_single["node"]
        assert len(held_pair["gpus"]) == 2 and held_pair["gpus"][0] % 2 == 0 and len(held_single["gpus"]) == 1
        assert not set(held_pair["gpus"]) & set(held_single["gpus"])
        first, last = held_pair["gpus"][0], held_pair["gpus"][-1]
        assert held_pair["gpu_label"] == f"GPUs {first}–{last}"
        assert held_single["gpu_label"] == f"GPU {held_single['gpus'][0]}"
        assert pair["price"] == {
            "currency": "USD",
            "per_gpu_hour": "2.5000",
            "instances": 1,
            "gpus_per_instance": 2,
            "per_instance_hour": "5.0000",
            "gpu_count": 2,
            "hours": "2.0000",
            "estimated_total": "10.00",
        }
        # The detail says the same as the database holds.
        detail = client.get(f"/api/v1/reservations/{pair['id']}/").json()
        allocation = Allocation.objects.get(reservation_id=pair["id"])
        assert detail["allocations"][0]["node"] == allocation.node.hostname
        assert detail["allocations"][0]["gpus"] == list(allocation.gpu_indices)

    def test_a_whole_node_lists_all_its_gpus(self, tenant, client_for, fleet):
        body = post(client_for(tenant), {"offer": fleet["node_offer"].id, "duration_hours": 1}).json()
        assert body["allocations"][0]["gpus"] == list(range(8)) and body["allocations"][0]["gpu_label"] == "GPUs 0–7"

    @pytest.mark.parametrize("quantity", [2, 5])
    def test_more_than_one_instance_of_a_slice_is_400_on_quantity_and_writes_nothing(
        self, tenant, client_for, slices, quantity
    ):
        response = post(client_for(tenant), {"offer": slices[1].id, "quantity": quantity, "duration_hours": 1})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid" and "use quantity 1" in error["message"]
        assert list(error["fields"]) == ["quantity"]
        assert not Reservation.objects.exists()

    def test_the_quote_says_instances_gpus_and_per_instance_price_and_makes_nothing(
        self, tenant, client_for, fleet, slices
    ):
        client = client_for(tenant)
        response = client.post(
            "/api/v1/reservations/quote/", {"offer": slices[4].id, "duration_hours": 3}, format="json"
        )
        assert response.status_code == 200, response.content
        body = response.json()
        assert (body["quantity"], body["node_count"], body["gpu_count"]) == (1, 1, 4)
        assert body["offer"] == {"id": slices[4].id, "name": str(slices[4]), "kind": "slice", "gpus_per_instance": 4}
        assert body["price"]["per_instance_hour"] == "10.0000" and body["price"]["estimated_total"] == "30.00"
        nodes = client.post(
            "/api/v1/reservations/quote/",
            {"offer": fleet["node_offer"].id, "quantity": 2, "duration_hours": 1},
            format="json",
        ).json()
        assert (nodes["price"]["instances"], nodes["price"]["gpus_per_instance"], nodes["gpu_count"]) == (2, 8, 16)
        assert not Reservation.objects.exists()

    def test_the_quote_refuses_as_reserving_would(self, tenant, client_for, fleet, slices):
        client = client_for(tenant)
        too_many = client.post(
            "/api/v1/reservations/quote/", {"offer": slices[2].id, "quantity": 3, "duration_hours": 1}, format="json"
        )
        assert too_many.status_code == 400 and "quantity" in too_many.json()["error"]["fields"]
        reservation_create(tenant=tenant, offer=fleet["node_offer"], quantity=5, start=None, end=hours_from_now(2))
        full = client.post("/api/v1/reservations/quote/", {"offer": slices[1].id, "duration_hours": 1}, format="json")
        assert full.status_code == 409 and full.json()["error"]["code"] == "capacity_unavailable"
        assert Reservation.objects.count() == 1

    def test_the_calendar_counts_free_instances_and_their_gpus(self, tenant, client_for, fleet, slices):
        start = (timezone.now() + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
        reservation_create(tenant=tenant, offer=slices[2], quantity=1, start=start, end=start + timedelta(hours=1))
        client = client_for(tenant)

        def hours(offer):
            body = client.get(
                f"/api/v1/offers/{offer.id}/availability/",
                {"start": start.isoformat(), "end": (start + timedelta(hours=2)).isoformat()},
            ).json()
            assert body["unit"] == "instances" and body["gpus_per_instance"] == offer.gpus_per_instance
            return [(h["free"], h["total"], h["free_gpus"], h["total_gpus"]) for h in body["hours"]]

        # Five 8-GPU nodes; two of one node's GPUs held in the first hour.
        assert hours(slices[1]) == [(38, 40, 38, 40), (40, 40, 40, 40)]
        assert hours(slices[2]) == [(19, 20, 38, 40), (20, 20, 40, 40)]
        assert hours(slices[4]) == [(9, 10, 36, 40), (10, 10, 40, 40)]
        assert hours(fleet["node_offer"]) == [(4, 5, 32, 40), (5, 5, 40, 40)]  # that node is not whole


class TestAvailabilityCalendar:
    def test_hourly_free_nodes_reflect_reservations(self, tenant, client_for, fleet):
        start = (timezone.now() + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
        reservation_create(
            tenant=tenant, offer=fleet["node_offer"], quantity=3, start=start, end=start + timedelta(hours=2)
        )
        response = client_for(tenant).get(
            f"/api/v1/offers/{fleet['node_offer'].id}/availability/",
            {"start": start.isoformat(), "end": (start + timedelta(hours=4)).isoformat()},
        )
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["unit"] == "instances" and body["gpus_per_instance"] == 8  # a whole node is one instance
        assert [(h["free"], h["total"]) for h in body["hours"]] == [(2, 5), (2, 5), (5, 5), (5, 5)]
        assert [(h["free_gpus"], h["total_gpus"]) for h in body["hours"]] == [(16, 40), (16, 40), (40, 40), (40, 40)]

    def test_rack_calendar_counts_whole_racks(self, tenant, client_for, fleet):
        start = (timezone.now() + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
        one = reservation_create(
            tenant=tenant, offer=fleet["node_offer"], quantity=1, start=start, end=start + timedelta(hours=1)
        )
        held_rack = one.allocations.get().node.rack
        body = (
            client_for(tenant)
            .get(
                f"/api/v1/offers/{fleet['rack_offer'].id}/availability/",
                {"start": start.isoformat(), "end": (start + timedelta(hours=2)).isoformat()},
            )
            .json()
        )
        assert body["unit"] == "racks"
        assert [(h["free"], h["total"]) for h in body["hours"]] == [(1, 2), (2, 2)]
        # The other rack's GPUs stay free while a node of one rack is held.
        free_then = 40 - 8 * held_rack.nodes.count()
        assert [(h["free_gpus"], h["total_gpus"]) for h in body["hours"]] == [(free_then, 40), (40, 40)]

    @pytest.mark.parametrize(
        "query",
        [
            {"start": "2030-01-02T00:00:00Z", "end": "2030-01-01T00:00:00Z"},
            {"start": "2030-01-01T00:00:00Z", "end": "2030-02-01T00:00:00Z"},
            {"start": "tomorrow"},
        ],
    )
    def test_bad_ranges_are_400(self, tenant, client_for, fleet, query):
        response = client_for(tenant).get(f"/api/v1/offers/{fleet['node_offer'].id}/availability/", query)
        assert response.status_code == 400

    def test_catalog_availability_now_counts_held_nodes(self, tenant, client_for, fleet):
        reservation_create(tenant=tenant, offer=fleet["node_offer"], quantity=2, start=None, end=hours_from_now(1))
        offers = {o["id"]: o for o in client_for(tenant).get("/api/v1/offers/").json()["results"]}
        assert offers[fleet["node_offer"].id]["availability"]["available_nodes"] == 3
        assert offers[fleet["rack_offer"].id]["availability"]["available_racks"] == 1


class TestLifecycleTiming:
    @pytest.mark.django_db(transaction=True)  # events leave on commit
    def test_beat_moves_started_and_ended_reservations_and_publishes(self, tenant, fleet):
        now = timezone.now()

        def timeline():
            due = reservation_create(
                tenant=tenant, offer=fleet["node_offer"], quantity=1, start=None, end=now + timedelta(hours=1)
            )
            later = reservation_create(
                tenant=tenant,
                offer=fleet["node_offer"],
                quantity=1,
                start=now + timedelta(hours=2),
                end=now + timedelta(hours=3),
            )
            steps = [
                reservations_advance(now=now + timedelta(seconds=1)),
                reservations_advance(now=now + timedelta(seconds=2)),
            ]
            due.refresh_from_db()
            later.refresh_from_db()
            states = (due.state, later.state)
            steps.append(reservations_advance(now=now + timedelta(hours=1, seconds=1)))
            due.refresh_from_db()
            return due, states, steps

        async def scenario():
            layer = get_channel_layer()
            channel = await layer.new_channel()
            await layer.group_add(tenant_group(tenant.organization.id), channel)
            result = await sync_to_async(timeline)()
            events = []
            try:
                while True:
                    message = await asyncio.wait_for(layer.receive(channel), timeout=1)
                    if message["event"].startswith("reservation."):  # not billing.balance
                        events.append((message["event"], message["data"]["id"]))
            except TimeoutError:
                pass
            return result, events

        (due, states, steps), events = async_to_sync(scenario)()
        assert steps[0]["begun"] == 1 and steps[1] == {"begun": 0, "ended": 0}
        assert states == (S.PROVISIONING, S.PENDING)
        assert steps[2] == {"begun": 0, "ended": 1}
        assert due.state == S.RELEASING  # its agents tear the nodes down next (tests/e2e)
        assert [e for e, rid in events if rid == str(due.id)] == [
            "reservation.created",
            "reservation.provisioning",
            "reservation.releasing",
        ]

    def test_the_tick_is_scheduled_on_beat(self, settings):
        entry = settings.CELERY_BEAT_SCHEDULE["reservations-tick"]
        assert entry["task"] in celery_app.tasks or entry["task"] == "marketplace.tasks.reservations_tick"
        import marketplace.tasks  # noqa: F401 - registers the task

        assert "marketplace.tasks.reservations_tick" in celery_app.tasks


class TestEarliestFit:
    """The sweep in capacity.earliest_fit against a brute force over the same random bookings."""

    @pytest.mark.parametrize("seed", range(6))
    def test_the_sweep_agrees_with_brute_force(self, seed, fleet):
        import random

        from django.db.backends.postgresql.psycopg_any import DateTimeTZRange, NumericRange

        rng = random.Random(seed)
        offer, rack_offer = fleet["node_offer"], fleet["rack_offer"]
        nodes = fleet["nodes"]["a"] + fleet["nodes"]["b"]
        t0 = timezone.now().replace(microsecond=0) + timedelta(hours=1)
        holder = make_tenant(role=Role.MEMBER)
        busy = {node.pk: [] for node in nodes}
        for node in nodes:
            cursor = t0 + timedelta(hours=rng.randint(-2, 3))
            for _ in range(rng.randint(0, 4)):
                length = timedelta(hours=rng.randint(1, 5))
                reservation = Reservation.objects.create(
                    organization=holder.organization,
                    offer=offer,
                    shape="node",
                    quantity=1,
                    node_count=1,
                    gpu_count=8,
                    period=DateTimeTZRange(cursor, cursor + length, "[)"),
                    price_per_gpu_hour=1,
                )
                Allocation.objects.create(
                    reservation=reservation,
                    node=node,
                    gpus=NumericRange(0, 8),
                    period=DateTimeTZRange(cursor, cursor + length, "[)"),
                )
                busy[node.pk].append((cursor, cursor + length))
                cursor += length + timedelta(hours=rng.randint(0, 3))

        def free(node_id, start, end):
            return all(end <= lo or start >= hi for lo, hi in busy[node_id])

        def brute(quantity, duration, racks=False):
            candidates = sorted({t0} | {hi for spans in busy.values() for _lo, hi in spans if hi > t0})
            for t in candidates:
                if racks:
                    if any(all(free(n.pk, t, t + duration) for n in group) for group in fleet["nodes"].values()):
                        return t
                elif sum(free(n.pk, t, t + duration) for n in nodes) >= quantity:
                    return t
            return None

        for quantity in (1, 2, 3, 5, 6):
            for hours in (1, 3, 8):
                duration = timedelta(hours=hours)
                assert earliest_fit(offer=offer, quantity=quantity, start=t0, duration=duration) == brute(
                    quantity, duration
                ), (quantity, hours)
        for hours in (1, 4):
            duration = timedelta(hours=hours)
            assert earliest_fit(offer=rack_offer, quantity=1, start=t0, duration=duration) == brute(
                1, duration, racks=True
            ), hours
