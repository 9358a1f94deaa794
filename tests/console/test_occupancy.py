"""Per-GPU occupancy for operators (issue 12): a node can be partly rented, and the fleet heatmap and
/metrics show which of its GPUs are."""

import re
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.services.catalog.offers import offer_create
from marketplace.services.reservations.lifecycle import reservation_create
from tests.factories import (
    PASSWORD,
    AcceleratorTypeFactory,
    RackFactory,
    SiteFactory,
    activate,
    make_node,
    make_tenant,
    make_user,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def partly_rented():
    """Two 8-GPU nodes: one holds a 2-GPU and a 1-GPU slice now (3 of 8 rented), the other nothing; a
    4-GPU slice booked for tomorrow is not rented now."""
    site = SiteFactory()
    accelerator = AcceleratorTypeFactory()
    rack = RackFactory(site=site)
    nodes = [make_node(rack=rack, accelerator=accelerator) for _ in range(2)]

    def reserve(size, *, hours_from_now=0):
        offer = offer_create(
            site=site, accelerator_type=accelerator, price_per_gpu_hour=Decimal(1), gpus_per_instance=size
        )
        start = timezone.now() + timezone.timedelta(hours=hours_from_now)
        return reservation_create(
            tenant=make_tenant(), offer=offer, quantity=1, start=start, end=start + timezone.timedelta(hours=2)
        )

    activate(reserve(2))
    reserve(1)  # pending, but its period has begun: its GPU is held now
    reserve(4, hours_from_now=24)
    rented = nodes[0] if nodes[0].allocations.exists() else nodes[1]
    return {"rented": rented, "free": nodes[1] if rented == nodes[0] else nodes[0]}


def test_the_fleet_heatmap_marks_each_rented_gpu_of_a_partly_rented_node(partly_rented):
    operator = make_user(is_staff=True)
    staff = Client()
    staff.login(username=operator.email, password=PASSWORD)
    page = staff.get("/fleet/").content.decode()
    node = partly_rented["rented"].hostname
    cell = re.search(rf'<a class="cell"[^>]*data-node="{node}"[^>]*>(.*?)</a>', page, re.S)
    assert cell is not None
    assert 'data-rented="3"' in cell.group(0)
    assert "3 of 8 GPUs rented" in cell.group(0)
    strip = re.findall(r"<i( data-rented)?></i>", cell.group(1))
    assert [bool(mark) for mark in strip] == [True, True, True, False, False, False, False, False]
    free = re.search(rf'<a class="cell"[^>]*data-node="{partly_rented["free"].hostname}"[^>]*>', page)
    assert 'data-rented="0"' in free.group(0)
    assert "3 of 16 GPUs rented" in page
    assert re.search(r"<dt>GPUs rented</dt><dd data-rented-total>3</dd>", page)


def test_the_fleet_page_shows_each_racks_committed_power_against_its_budget(partly_rented):
    """The GPUs held now (3 H100, at 700 W) against the rack's 44 kW; the 4-GPU slice of tomorrow is not
    committed now. A budget an operator lowered below what is held shows as over it."""
    operator = make_user(is_staff=True)
    staff = Client()
    staff.login(username=operator.email, password=PASSWORD)
    rack = partly_rented["rented"].rack

    def committed():
        page = staff.get("/fleet/").content.decode()
        block = re.search(rf'<div class="rack" data-rack="{rack.name}".*?<ul class="cells"', page, re.S).group(0)
        line = re.search(
            r'<div class="rack-committed([^"]*)"[^>]*>.*?<span class="rack-committed-text">([^<]*)</span>', block, re.S
        )
        bar = re.search(r'<div class="rack-bar rack-bar-committed"[^>]*><span style="width: ([\d.]+)%"', block)
        return line.group(1).strip(), line.group(2), bar.group(1)

    assert committed() == ("", "2.1 / 44 kW", "4.8")
    type(rack).objects.filter(pk=rack.pk).update(power_budget_kw=Decimal("2"))
    assert committed() == ("over-budget", "2.1 / 2 kW", "100.0")


def test_metrics_report_each_gpus_occupancy(partly_rented, settings):
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    text = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-token").content.decode()
    node = partly_rented["rented"].hostname
    rented = {
        int(gpu): float(value)
        for gpu, value in re.findall(
            rf'neocloud_gpu_rented{{gpu="(\d+)",modelName="[^"]*",node="{node}"[^}}]*}} (\S+)', text
        )
    }
    assert rented == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0, 7: 0.0}
    assert 'neocloud_gpus{state="rented"} 3.0' in text
    assert 'neocloud_gpus{state="free"} 13.0' in text
