"""How provisioning reports back without importing marketplace (ARCHITECTURE, Packages): marketplace
registers callbacks here when its app is ready. Hooks run inside the transaction of the change they
report, so what they write commits or rolls back with it."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

_command_finished: list[Callable] = []
_command_progress: list[Callable] = []
_node_audience: list[Callable] = []


def on_command_finished(callback: Callable) -> Callable:
    """Register ``callback(command)``, called when a NodeCommand succeeds or fails."""
    if callback not in _command_finished:
        _command_finished.append(callback)
    return callback


def on_command_progress(callback: Callable) -> Callable:
    """Register ``callback(command)``, called when an agent reports progress on a command."""
    if callback not in _command_progress:
        _command_progress.append(callback)
    return callback


def command_finished(command) -> None:
    for callback in _command_finished:
        callback(command)


def command_progress(command) -> None:
    for callback in _command_progress:
        callback(command)


class Audience(NamedTuple):
    """A Channels group that may see some of a node's GPUs' telemetry right now: a tenant reservation
    holding them. Several reservations may hold GPUs of one node at once (slices), each its own."""

    group: str
    gpus: range  # the node's GPU indices (Gpu.index) it holds


def on_node_audience(callback: Callable) -> Callable:
    """Register ``callback(node_id) -> list[Audience]``: the Channels groups (besides the operators'
    fleet group) that may see a node's telemetry right now, each with the GPUs it may see."""
    if callback not in _node_audience:
        _node_audience.append(callback)
    return callback


def node_audience(node_id: int) -> list[Audience]:
    return [audience for callback in _node_audience for audience in callback(node_id)]


@dataclass(frozen=True)
class GpuHolding:
    """GPUs of a node held for [start, end), as the layer that rents them says (a reservation): what
    the node's occupancy on its admin page shows. ``holder`` is that layer's row, for a link to it."""

    gpus: range
    start: datetime
    end: datetime
    label: str
    state: str = ""
    holder: object = None


_node_occupancy: list[Callable] = []


def on_node_occupancy(callback: Callable) -> Callable:
    """Register ``callback(*, node_id, start, end) -> list[GpuHolding]``: who holds which GPUs of a node
    at some time in [start, end)."""
    if callback not in _node_occupancy:
        _node_occupancy.append(callback)
    return callback


def node_occupancy(*, node_id: int, start: datetime, end: datetime) -> list[GpuHolding]:
    return [holding for callback in _node_occupancy for holding in callback(node_id=node_id, start=start, end=end)]


_workload_reported: list[Callable] = []


def on_workload_reported(callback: Callable) -> Callable:
    """Register ``callback(*, node_id, reservation, state, detail)``: an agent reported that a workload it
    runs on its node (named by the reservation it was provisioned for) is healthy, unhealthy or exited."""
    if callback not in _workload_reported:
        _workload_reported.append(callback)
    return callback


def workload_reported(*, node_id: int, reservation: str, state: str, detail: str = "") -> None:
    for callback in _workload_reported:
        callback(node_id=node_id, reservation=reservation, state=state, detail=detail)
