"""How provisioning reports back without importing marketplace (ARCHITECTURE, Packages): marketplace
registers callbacks here when its app is ready. Hooks run inside the transaction of the change they
report, so what they write commits or rolls back with it."""

from collections.abc import Callable

_command_finished: list[Callable] = []
_command_progress: list[Callable] = []


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
