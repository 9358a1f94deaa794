"""The demo world: `make demo` on a database other than the one its agents enrolled with, its past
month, its slices, and its inference endpoint with the API key and the banner that say how to call it."""

import csv
import io
import json
import stat
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.test import Client, override_settings

from console.demo import DEMO_PASSWORD, DEMO_SLICES, demo_agent_tokens, seed_demo_latencies
from console.kernel.tokens import new_token
from console.launcher import API_KEY_FILE, _banner
from marketplace.choices import ReplicaState, Role
from marketplace.models import Allocation, Endpoint, Invoice, LedgerEntry, Offer, Reservation, ServedModel
from marketplace.services.endpoints.replicas import candidate_offers, serve_params
from marketplace.services.tenancy.api_keys import api_key_authenticate
from provisioning.agent.credentials import Credentials, has_credentials, load_credentials, store_credentials
from provisioning.models import RegionSiteLatency
from provisioning.services.agents import NODE_SECRET_SCHEME, bootstrap_token_create, node_enrol
from provisioning.services.fleet import region_latency_set
from tests.factories import make_node

pytestmark = pytest.mark.django_db


def enrolled(node) -> str:
    """Enrol ``node`` as its agent would; its secret."""
    _node, secret = node_enrol(token=bootstrap_token_create(node=node, actor="test"), hostname=node.hostname)
    return secret


def test_credentials_this_database_does_not_know_are_deleted_and_their_nodes_enrol_afresh(tmp_path):
    known, never_enrolled, enrolled_elsewhere = make_node(), make_node(), make_node()
    store_credentials(tmp_path / known.hostname, Credentials(node=known.hostname, secret=enrolled(known)))
    # From an earlier demo on another database: secrets this one never issued.
    other_secret = new_token(NODE_SECRET_SCHEME).plaintext
    store_credentials(
        tmp_path / never_enrolled.hostname, Credentials(node=never_enrolled.hostname, secret=other_secret)
    )
    enrolled(enrolled_elsewhere)  # this database knows another secret for it
    store_credentials(
        tmp_path / enrolled_elsewhere.hostname, Credentials(node=enrolled_elsewhere.hostname, secret=other_secret)
    )

    tokens = demo_agent_tokens(state_dir=tmp_path)

    by_host = {entry["hostname"]: entry for entry in tokens.entries}
    assert by_host[known.hostname]["token"] is None  # its stored secret works: kept
    assert load_credentials(tmp_path / known.hostname).node == known.hostname
    assert sorted(tokens.stale) == sorted([never_enrolled.hostname, enrolled_elsewhere.hostname])
    for stale in (never_enrolled, enrolled_elsewhere):
        assert by_host[stale.hostname]["token"].startswith("ncb_")
        assert not has_credentials(tmp_path / stale.hostname)  # the fleet enrols with the token, not the old secret


def test_seed_demo_says_it_enrols_stale_agents_afresh(tmp_path):
    node = make_node()  # a fleet exists, so seeding leaves the world alone
    store_credentials(tmp_path / "agents" / node.hostname, Credentials(node=node.hostname, secret="ncn_x_y"))
    out = io.StringIO()
    call_command("seed_demo", agent_tokens=tmp_path / "tokens.json", agent_state=tmp_path / "agents", stdout=out)
    assert "1 node credentials in" in out.getvalue() and "enrol afresh" in out.getvalue()
    entry = json.loads((tmp_path / "tokens.json").read_text())[0]
    assert entry["hostname"] == node.hostname and entry["token"]


def test_the_demo_seeds_a_finished_past_month_with_its_invoice_once():
    call_command("seed_demo", stdout=io.StringIO())
    past = Reservation.objects.get(state="completed")  # a new user's first look: a month that is over
    invoice = Invoice.objects.get(organization=past.organization)
    assert past.state == "completed" and past.billing_settled_at is not None
    assert invoice.month.month != past.created_at.month or invoice.month.year != past.created_at.year  # a past month
    assert past.activated_at.date().replace(day=1) == invoice.month and invoice.total > 0
    # 53 h 18 min of 8 H100 at $2.49: what the invoice says, from the rated usage.
    assert invoice.total == (8 * Decimal("2.49") * Decimal(53 * 60 + 18) / 60).quantize(Decimal("0.01"))

    owner = Client()
    assert owner.login(username="owner@acme.example", password=DEMO_PASSWORD)
    billing = owner.get("/billing/").content.decode()
    assert invoice.number in billing
    assert owner.get(f"/billing/invoices/{invoice.id}/").status_code == 200
    rows = list(csv.reader(io.StringIO(owner.get(f"/billing/invoices/{invoice.id}/csv/").content.decode())))
    assert len(rows) >= 3 and str(past.id) in " ".join(rows[1])  # header, the line, the totals

    entries = LedgerEntry.objects.count()
    call_command("seed_demo", stdout=io.StringIO())  # again: nothing more
    assert Reservation.objects.count() == 1 + len(DEMO_SLICES) + 1  # the past month, the slices, the replica
    assert Invoice.objects.count() == 1 and LedgerEntry.objects.count() == entries


def test_the_demo_rents_slices_of_one_node_to_two_tenants_next_to_whole_nodes():
    call_command("seed_demo", stdout=io.StringIO())
    h100 = Offer.objects.filter(site__slug="fra-hall-1", accelerator_type__slug="h100-sxm-80gb")
    assert sorted(o.kind + str(o.gpus_per_instance) for o in h100) == ["node8", "rack8", "slice1", "slice2", "slice4"]
    assert not Offer.objects.filter(accelerator_type__slug="gaudi3-128gb", gpus_per_instance__lt=8).exists()
    # the tenants' own rentals (the endpoint's replica holds a slice too, in Amsterdam)
    slices = Reservation.objects.filter(offer__gpus_per_instance__lt=8, state="pending", replica__isnull=True)
    assert slices.count() == len(DEMO_SLICES)
    assert {r.organization.slug for r in slices} == {"acme", "globex"}
    allocations = Allocation.objects.filter(reservation__in=slices)
    assert len({a.node_id for a in allocations}) == 1  # one node, partly rented
    held = [i for a in allocations for i in a.gpu_indices]
    assert len(held) == len(set(held)) == 7
    node = allocations.first().node
    owner = Client()
    assert owner.login(username="owner@acme.example", password=DEMO_PASSWORD)
    catalog = owner.get("/catalog/").content.decode()
    assert "Slice of a node" in catalog and "Whole node" in catalog and "Whole rack" in catalog
    mine = slices.get(organization__slug="acme", offer__gpus_per_instance=1)
    page = owner.get(f"/reservations/{mine.id}/").content.decode()
    assert f"<code>{node.hostname}</code> · GPU 0" in page
    operator = Client()
    assert operator.login(username="ops@neocloud.example", password=DEMO_PASSWORD)
    occupancy = operator.get(f"/admin/provisioning/node/{node.pk}/change/").content.decode()
    assert occupancy.count("<tr data-holding>") == len(DEMO_SLICES)


def test_the_demo_seeds_acme_an_embeddings_endpoint_with_its_first_replica_placed_once():
    call_command("seed_demo", stdout=io.StringIO())
    call_command("seed_demo", stdout=io.StringIO())  # again: nothing more

    model = ServedModel.objects.get()
    endpoint = Endpoint.objects.select_related("organization", "created_by").get()
    replica = endpoint.replicas.select_related("reservation__offer__site", "reservation__offer__accelerator_type").get()
    offer = replica.reservation.offer
    assert (model.slug, model.name, model.task, model.dimensions, model.gpus_per_replica) == (
        "all-minilm-l6-v2",
        "all-MiniLM-L6-v2",
        "embeddings",
        384,
        1,
    )
    # The venv's python: the agent puts its own programs directory first on a server's PATH.
    assert model.server_program[:5] == ["python", "-m", "provisioning.agent.serving", "--model-package", model.weights]
    assert sorted(model.accelerator_types.values_list("slug", flat=True)) == [
        "h100-sxm-80gb",
        "h200-sxm-141gb",
        "l40s-48gb",
        "mi300x-192gb",
    ], "every type the demo offers slices of"
    assert (endpoint.organization.slug, endpoint.name, endpoint.min_replicas, endpoint.max_replicas) == (
        "acme",
        "minilm",
        1,
        2,
    )
    assert endpoint.created_by.email == "member@acme.example" and endpoint.state == "deploying"
    assert replica.state == ReplicaState.STARTING
    assert (offer.site.slug, offer.accelerator_type.slug, offer.gpus_per_instance) == ("ams-edge-1", "l40s-48gb", 1)
    serve = serve_params(replica.reservation)["serve"]
    assert serve["program"][-2:] == ["--served-name", "minilm"], "clients send the endpoint's name as model"


def test_the_demo_seeds_measured_round_trips_from_its_regions_to_its_sites_once():
    call_command("seed_demo", stdout=io.StringIO())
    table = {(row.region, row.site.slug): row for row in RegionSiteLatency.objects.select_related("site")}
    assert {pair: row.rtt_ms for pair, row in table.items()} == {
        # users in Zurich (eu-central), Paris (eu-west), Dallas (us-central); Frankfurt's site counts as
        # Zurich's, Amsterdam's as Paris's; one city: the smallest round trip measured (Milan -> Zurich)
        ("eu-central", "fra-hall-1"): Decimal("11.17"),
        ("eu-central", "ams-edge-1"): Decimal("108.06"),  # Paris -> Zurich, the only way measured
        ("eu-central", "dal-hall-1"): Decimal("127.74"),  # Dallas -> Zurich, the only way measured
        ("eu-west", "ams-edge-1"): Decimal("11.17"),
        ("eu-west", "fra-hall-1"): Decimal("108.06"),
        ("eu-west", "dal-hall-1"): Decimal("131.79"),
        ("us-central", "dal-hall-1"): Decimal("11.17"),
        ("us-central", "fra-hall-1"): Decimal("127.74"),
        ("us-central", "ams-edge-1"): Decimal("130.94"),
    }
    assert table[("eu-west", "dal-hall-1")].source == "Paris → Dallas (WonderProxy ping, 2011)"
    assert table[("eu-central", "ams-edge-1")].source.startswith("Paris → Zurich, the only way measured")
    # Again (an older demo database, or an operator's own figure): nothing added, nothing overwritten.
    region_latency_set(region="eu-west", site=table[("eu-west", "fra-hall-1")].site, rtt_ms=Decimal("15"))
    call_command("seed_demo", stdout=io.StringIO())
    assert seed_demo_latencies() == 0 and RegionSiteLatency.objects.count() == 9
    assert RegionSiteLatency.objects.get(region="eu-west", site__slug="fra-hall-1").rtt_ms == Decimal("15")
    # The demo endpoint's users are in eu-west: Amsterdam's edge first, then Frankfurt, then Dallas.
    endpoint = Endpoint.objects.get()
    assert list(dict.fromkeys(o.site.slug for o in candidate_offers(endpoint))) == [
        "ams-edge-1",
        "fra-hall-1",
        "dal-hall-1",
    ]


def test_the_demo_writes_an_api_key_of_acme_to_a_file_only_its_owner_reads_and_keeps_it(tmp_path):
    path = tmp_path / API_KEY_FILE
    out = io.StringIO()
    call_command("seed_demo", api_key_file=path, stdout=out)
    first = path.read_text().strip()
    key = api_key_authenticate(raw_key=first)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.organization.slug == "acme" and key.role == Role.MEMBER and key.parent is None
    assert f"Wrote a new API key of Acme AI to {path}" in out.getvalue() and first not in out.getvalue()

    call_command("seed_demo", api_key_file=path, stdout=io.StringIO())
    assert path.read_text().strip() == first, "a key this database accepts is kept"

    path.write_text(new_token("nck").plaintext + "\n")  # from a demo on another database
    path.chmod(0o644)
    call_command("seed_demo", api_key_file=path, stdout=io.StringIO())
    replaced = path.read_text().strip()
    assert replaced != first and api_key_authenticate(raw_key=replaced).organization.slug == "acme"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@override_settings(GATEWAY_URL="http://127.0.0.1:8001")
def test_the_banner_says_how_to_call_the_demo_endpoint_with_the_openai_client(tmp_path):
    call_command("seed_demo", api_key_file=tmp_path / API_KEY_FILE, stdout=io.StringIO())
    banner = _banner("http://127.0.0.1:8000", tmp_path)
    lines = banner.splitlines()
    start = lines.index("from openai import OpenAI")
    snippet = "\n".join(lines[start : lines.index("", start)])

    assert "  Base URL    http://127.0.0.1:8001/v1" in lines
    assert "  Model       minilm  (all-MiniLM-L6-v2, embeddings)" in lines
    assert "base_url='http://127.0.0.1:8001/v1'" in snippet and f"open({str(tmp_path / API_KEY_FILE)!r})" in snippet
    assert "embeddings.create(model='minilm', input=['hello'])" in snippet
    compile(snippet, "<banner>", "exec")  # pastes into Python as it is
    assert (tmp_path / API_KEY_FILE).read_text().strip() not in banner, "the key's plaintext stays in its file"


def test_the_banner_leaves_the_endpoint_out_when_there_is_none(tmp_path):
    assert "Inference endpoint" not in _banner("http://127.0.0.1:8000", tmp_path)
