"""/metrics for Prometheus, behind the operators' METRICS_TOKEN (Authorization: Bearer …).

GPU readings under dcgm-exporter's names with node, gpu, uuid, site and modelName labels, from each
node's latest batch; each GPU's occupancy (rented now or not: a node can be partly rented); the
control plane: reservations by state, agents connected, telemetry batches accepted and rejected
(counters: take their rate()); and inference endpoints, labelled by endpoint (its id), endpoint_name and
tenant (the organization's slug): requests by outcome and a latency histogram (what the gateways
counted, as collected into PostgreSQL every few seconds), replicas by state, cold starts (replicas that
came to answer) with a histogram of how long they took, and the requests in flight now (the gateways'
Redis counts)."""

import hmac
import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Count
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis import RedisError

from console.kernel.errors import error_body
from marketplace.choices import ReplicaState
from marketplace.models import LATENCY_BUCKETS_MS, Reservation, TrafficOutcome
from marketplace.selectors.capacity import gpus_held_now
from marketplace.selectors.endpoints import COLD_START_BUCKETS_S, LIVE_IN_FLIGHT_SECONDS, endpoint_metrics_totals
from marketplace.services.endpoints.concurrency import concurrency_series
from provisioning.models import Node
from provisioning.selectors import telemetry as telemetry_reads
from provisioning.services import telemetry

logger = logging.getLogger(__name__)
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
        yield from _endpoints()

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


ENDPOINT_LABELS = ["endpoint", "endpoint_name", "tenant"]


def _cumulative(counts: list[int]) -> list[int]:
    running, out = 0, []
    for count in counts:
        running += count
        out.append(running)
    return out


def _endpoints():
    endpoints = endpoint_metrics_totals()
    requests = CounterMetricFamily(
        "neocloud_endpoint_requests",
        "Requests the gateways answered, by outcome.",
        labels=[*ENDPOINT_LABELS, "outcome"],
    )
    latency = HistogramMetricFamily(
        "neocloud_endpoint_request_latency_ms",
        "Request latency at the gateway (in ms), every outcome.",
        labels=ENDPOINT_LABELS,
    )
    replicas = GaugeMetricFamily(
        "neocloud_endpoint_replicas", "Replicas by state (stopped ones left out).", labels=[*ENDPOINT_LABELS, "state"]
    )
    cold_starts = CounterMetricFamily(
        "neocloud_endpoint_cold_starts", "Replicas that came to answer (placed, then ready).", labels=ENDPOINT_LABELS
    )
    cold_start_seconds = HistogramMetricFamily(
        "neocloud_endpoint_cold_start_seconds",
        "How long a replica took from placed to answering (in s).",
        labels=ENDPOINT_LABELS,
    )
    in_flight = GaugeMetricFamily(
        "neocloud_endpoint_in_flight",
        f"Requests in flight at the gateways, all processes (the last {LIVE_IN_FLIGHT_SECONDS} s' average).",
        labels=ENDPOINT_LABELS,
    )
    try:
        series = concurrency_series([e["id"] for e in endpoints], seconds=LIVE_IN_FLIGHT_SECONDS)
    except RedisError:  # the rest is PostgreSQL's: leave only this gauge out
        logger.warning("/metrics: the gateways' concurrency could not be read", exc_info=True)
        series = None
    states = [state for state in ReplicaState.values if state != ReplicaState.STOPPED]
    latency_bounds = [str(float(bound)) for bound in LATENCY_BUCKETS_MS] + ["+Inf"]
    cold_bounds = [str(float(bound)) for bound in COLD_START_BUCKETS_S] + ["+Inf"]
    for e in endpoints:
        labels = [str(e["id"]), e["name"], e["tenant"]]
        for outcome in TrafficOutcome.values:
            requests.add_metric([*labels, outcome], e["requests"][outcome])
        counts = _cumulative(e["latency_buckets"])
        latency.add_metric(labels, list(zip(latency_bounds, counts, strict=True)), sum_value=e["latency_ms_sum"])
        for state in states:
            replicas.add_metric([*labels, state], e["replicas"].get(state, 0))
        cold_starts.add_metric(labels, e["cold_starts"])
        cold_start_seconds.add_metric(
            labels,
            list(zip(cold_bounds, [*e["cold_start_buckets"], e["cold_starts"]], strict=True)),
            sum_value=e["cold_start_seconds"],
        )
        if series is not None:
            values = series[str(e["id"])].concurrency
            in_flight.add_metric(labels, round(sum(values) / len(values), 3) if values else 0.0)
    yield from (requests, latency, replicas, cold_starts, cold_start_seconds)
    if series is not None:
        yield in_flight


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
