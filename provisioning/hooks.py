"""How provisioning reports back without importing marketplace (ARCHITECTURE, Packages): marketplace
registers callbacks here when its app is ready. Hooks run inside the transaction of the change they
report, so what they write commits or rolls back with it."""

from collections.abc import Callable
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
