"""/metrics for Prometheus, behind the operators' METRICS_TOKEN (Authorization: Bearer …).

GPU readings under dcgm-exporter's names with node, gpu, uuid, site and modelName labels, from each
node's latest batch; each GPU's occupancy (rented now or not: a node can be partly rented); and the
control plane: reservations by state, agents connected, telemetry batches accepted and rejected
(counters: take their rate())."""

import hmac
from datetime import timedelta

from django.conf import settings
from django.db.models import Count
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from console.kernel.errors import error_body
from marketplace.models import Reservation
from marketplace.selectors.capacity import gpus_held_now
from provisioning.models import Node
from provisioning.selectors import telemetry as telemetry_reads
from provisioning.services import telemetry

GPU_FIELDS = {  # dcgm-exporter name: help
    telemetry.UTIL: "GPU utilization (in %).",
    telemetry.FB_USED: "Framebuffer memory used (in MiB).",
    telemetry.FB_TOTAL: "Framebuffer memory total (in MiB).",
    telemetry.POWER: "Power draw (in W).",
    telemetry.TEMP: "GPU temperature (in C).",
    telemetry.SM_CLOCK: "SM clock frequency (in MHz).",
    telemetry.ENERGY: "Total energy consumption since boot (in mJ).",
    telemetry.XID: "XID errors seen.",
    telemetry.ECC_DBE: "Total number of double-bit volatile ECC errors.",
}


class ConsoleCollector:
    def collect(self):
        nodes = {
            n.pk: n
            for n in Node.objects.select_related("rack__site", "accelerator_type").only(
                "hostname", "state", "gpu_count", "last_seen_at", "rack__site__slug", "accelerator_type__device_name"
            )
        }
        yield from self._gpus(nodes)
        yield from self._occupancy(nodes)
        states = GaugeMetricFamily("neocloud_reservations", "Reservations by state.", labels=["state"])
        for row in Reservation.objects.values("state").annotate(n=Count("id")):
            states.add_metric([row["state"]], row["n"])
        yield states
        silent_after = timezone.now() - timedelta(
            seconds=settings.AGENT_HEARTBEAT_SECONDS * settings.AGENT_MISSED_BEATS
        )
        connected = sum(1 for n in nodes.values() if n.last_seen_at and n.last_seen_at >= silent_after)
        yield GaugeMetricFamily("neocloud_agents_connected", "Node agents heard from recently.", value=connected)
        by_state = GaugeMetricFamily("neocloud_nodes", "Nodes by lifecycle state.", labels=["state"])
        for state, count in _count(n.state for n in nodes.values()).items():
            by_state.add_metric([state], count)
        yield by_state
        counters = telemetry_reads.telemetry_counters()
        batches = CounterMetricFamily("neocloud_telemetry_batches", "Telemetry batches from agents.", labels=["result"])
        for result in ("accepted", "rejected"):
            batches.add_metric([result], counters.get(result, 0))
        yield batches

    def _gpus(self, nodes):
        families = {
            name: GaugeMetricFamily(name, help_text, labels=["node", "gpu", "UUID", "site", "modelName"])
            for name, help_text in GPU_FIELDS.items()
        }
        for node_id, frame in telemetry_reads.latest_frames_by_node().items():
            node = nodes.get(node_id)
            if node is None:
                continue
            model = node.accelerator_type.device_name if node.accelerator_type else ""
            for gpu in frame["gpus"]:
                labels = [node.hostname, str(gpu.get("index", "")), gpu["uuid"], node.rack.site.slug, model]
                for name, family in families.items():
                    if gpu.get(name) is not None:
                        family.add_metric(labels, gpu[name])
        yield from families.values()

    def _occupancy(self, nodes):
        held = gpus_held_now()
        rented = GaugeMetricFamily(
            "neocloud_gpu_rented",
            "1 while a reservation holds the GPU, else 0 (sum by node or site: GPUs rented).",
            labels=["node", "gpu", "site", "modelName"],
        )
        totals = GaugeMetricFamily("neocloud_gpus", "GPUs of the fleet, rented or free now.", labels=["state"])
        count = {"rented": 0, "free": 0}
        for node_id, node in nodes.items():
            taken = held.get(node_id, set())
            model = node.accelerator_type.device_name if node.accelerator_type else ""
            for index in range(node.gpu_count):
                is_rented = index in taken
                rented.add_metric([node.hostname, str(index), node.rack.site.slug, model], int(is_rented))
                count["rented" if is_rented else "free"] += 1
        for state, value in count.items():
            totals.add_metric([state], value)
        yield rented
        yield totals


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def metrics(request):
    expected = settings.METRICS_TOKEN
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if not expected:
        return JsonResponse(error_body("not_configured", "Set METRICS_TOKEN to enable /metrics."), status=404)
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        return JsonResponse(
            error_body("authentication_failed", "/metrics needs the operators' token."),
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ConsoleCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
