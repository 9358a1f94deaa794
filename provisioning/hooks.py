"""How provisioning reports back without importing marketplace (ARCHITECTURE, Packages): marketplace
registers callbacks here when its app is ready. Hooks run inside the transaction of the change they
report, so what they write commits or rolls back with it."""

from collections.abc import Callable

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


def on_node_audience(callback: Callable) -> Callable:
    """Register ``callback(node_id) -> list[str]``: the Channels groups (besides the operators' fleet
    group) that may see a node's telemetry right now — the tenant reservation holding it."""
    if callback not in _node_audience:
        _node_audience.append(callback)
    return callback


def node_audience(node_id: int) -> list[str]:
    return [group for callback in _node_audience for group in callback(node_id)]
