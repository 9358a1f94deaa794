"""Reads of the fleet. The fleet is public to tenants only as the catalog shows it (sites, types);
nodes and GPUs are for operators."""

from datetime import UTC, datetime, timedelta

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from provisioning import hooks
from provisioning.choices import NodeState
from provisioning.models import AcceleratorType, Node, Rack, RegionSiteLatency, Site
from provisioning.selectors.telemetry import latest_summaries


def site_list() -> QuerySet[Site]:
    return Site.objects.annotate(
        rack_count=Count("racks", distinct=True),
        node_count=Count("racks__nodes", distinct=True),
        available_node_count=Count("racks__nodes", filter=Q(racks__nodes__state=NodeState.AVAILABLE), distinct=True),
    ).order_by("region", "name")


def accelerator_type_list() -> QuerySet[AcceleratorType]:
    return AcceleratorType.objects.all()


def site_regions() -> list[str]:
    return list(Site.objects.order_by("region").values_list("region", flat=True).distinct())


def region_rtt_ms(*, region: str, site: str = "site") -> Subquery:
    """To annotate a query of things at sites (offers: ``site``; sites: ``pk``): the round trip in ms from
    ``region``'s users to each row's site, as the operator recorded it; null where none is recorded."""
    rows = RegionSiteLatency.objects.filter(region=region, site=OuterRef(site))
    return Subquery(rows.values("rtt_ms")[:1])


def fleet_overview() -> dict:
    """Sites → racks → nodes with each node's latest telemetry summary, for the operators' heatmap.
    Three queries and one Redis read, whatever the fleet size."""
    summaries = latest_summaries()
    nodes_by_rack: dict[int, list] = {}
    totals = {"nodes": 0, "gpus": 0, "available": 0, "offline": 0}
    for node in Node.objects.select_related("accelerator_type").order_by("hostname"):
        nodes_by_rack.setdefault(node.rack_id, []).append({"node": node, "summary": summaries.get(node.pk)})
        totals["nodes"] += 1
        totals["gpus"] += node.gpu_count
        totals["available"] += node.state == NodeState.AVAILABLE
        totals["offline"] += node.state == NodeState.OFFLINE
    racks_by_site: dict[int, list] = {}
    for rack in Rack.objects.order_by("name"):
        nodes = nodes_by_rack.get(rack.pk, [])
        watts = [n["summary"]["power"] for n in nodes if n["summary"] and n["summary"].get("power") is not None]
        racks_by_site.setdefault(rack.site_id, []).append(
            {"rack": rack, "nodes": nodes, "power_kw": round(sum(watts) / 1000, 1) if watts else None}
        )
    sites = []
    for site in Site.objects.order_by("region", "name"):
        racks = racks_by_site.get(site.pk, [])
        members = [n["node"] for r in racks for n in r["nodes"]]
        counts = {
            "nodes": len(members),
            "gpus": sum(n.gpu_count for n in members),
            "available": sum(n.state == NodeState.AVAILABLE for n in members),
            "offline": sum(n.state == NodeState.OFFLINE for n in members),
        }
        sites.append({"site": site, "racks": racks, "counts": counts})
    return {"sites": sites, "totals": totals}


def node_hardware_hints(node) -> dict:
    """What a simulated agent needs to pretend to be this node's hardware (`neocloud-agent fleet`)."""
    hints = {"gpus": node.gpu_count or 8}
    if node.accelerator_type is not None:
        hints.update(
            gpu_name=node.accelerator_type.device_name,
            gpu_memory_mib=node.accelerator_type.memory_gib * 1024,
            gpu_power_limit_w=node.accelerator_type.tdp_watts,
        )
    return hints


OCCUPANCY_TONES = 6  # colours the occupancy chart cycles through, one per holding


def node_gpu_occupancy(*, node: Node, now: datetime | None = None, days_before: int = 2, days_after: int = 14) -> dict:
    """Which GPUs of ``node`` are held by whom, when, from ``days_before`` days ago to ``days_after``
    days ahead (whole UTC days): the chart on the node's admin page. Who holds them comes from the layer
    that rents them (``hooks.node_occupancy``); provisioning only lays it out: a row per GPU index, each
    holding a bar on the rows of its GPUs, placed in percent of the window (clipped to it)."""
    now = now or timezone.now()
    start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days_before)
    end = start + timedelta(days=days_before + days_after + 1)
    span = (end - start).total_seconds()

    def percent(moment: datetime) -> float:
        return round(100 * (min(max(moment, start), end) - start).total_seconds() / span, 3)

    holdings = sorted(
        hooks.node_occupancy(node_id=node.pk, start=start, end=end), key=lambda h: (h.start, h.gpus.start)
    )
    entries = [{"holding": h, "tone": i % OCCUPANCY_TONES, "url": ""} for i, h in enumerate(holdings)]
    rows = {index: [] for index in range(node.gpu_count)}
    for entry in entries:
        holding = entry["holding"]
        left = percent(holding.start)
        bar = {"entry": entry, "left": left, "width": round(percent(holding.end) - left, 3)}
        for index in holding.gpus:
            rows.setdefault(index, []).append(bar)
    days = [start + timedelta(days=d) for d in range(days_before + days_after + 1)]
    return {
        "start": start,
        "end": end,
        "at": now,
        "now": percent(now),
        "days": [{"day": day, "left": percent(day)} for day in days],
        "rows": [{"index": index, "bars": bars} for index, bars in sorted(rows.items())],
        "entries": entries,
    }
