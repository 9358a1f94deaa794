from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.choices import ReservationState as S
from marketplace.models import LedgerEntry, UsageRecord
from marketplace.selectors.billing import balance_of
from marketplace.services import reservations as r
from marketplace.services.metering import usage_rate
from tests.factories import OfferFactory, RackFactory, make_node, make_tenant

pytestmark = pytest.mark.django_db


def test_smoke():
    tenant = make_tenant(credit="1000")
    offer = OfferFactory(price_per_gpu_hour=Decimal("3.60"))
    make_node(rack=RackFactory(site=offer.site), accelerator=offer.accelerator_type)
    now = timezone.now()
    res = r.reservation_create(tenant=tenant, offer=offer, quantity=1, start=None, end=now + timedelta(hours=2))
    b = balance_of(organization_id=tenant.organization.pk)
    print(b)
    assert Decimal("57.59") < b["held"] <= Decimal("57.6")
    r.reservation_begin(reservation_id=res.pk)
    r.reservation_activate(reservation_id=res.pk)
    res.refresh_from_db()
    usage_rate(now=res.activated_at + timedelta(seconds=100))
    usage_rate(now=res.activated_at + timedelta(seconds=100))
    r.reservation_release(reservation_id=res.pk)
    usage_rate()
    res.refresh_from_db()
    print(list(UsageRecord.objects.values("period", "seconds", "amount")))
    b = balance_of(organization_id=tenant.organization.pk)
    print(b)
    assert res.billing_settled_at
    assert b["held"] == 0
    with connection.cursor() as c:
        c.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert LedgerEntry.objects.count() > 4
