"""What a host driver does for the agent: prepare the host for a tenant (``provision``) and tear that down
(``release``, idempotent), reporting progress through a callback and returning a detail object for the
command's ``result``. A refusal or failure is a DriverError whose message the console shows as the
result's ``error``."""

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

ProgressCallback = Callable[[str, int], Awaitable[None]]
Params = Mapping[str, Any]


class DriverError(Exception):
    """The command failed; the message is what the console records as the result's error."""


class HostDriver(ABC):
    name: ClassVar[str]

    @abstractmethod
    async def provision(self, params: Params, progress: ProgressCallback) -> dict[str, Any]: ...

    @abstractmethod
    async def release(self, params: Params, progress: ProgressCallback) -> dict[str, Any]: ...


def reservation_of(params: Params) -> str:
    reservation = params.get("reservation")
    if not isinstance(reservation, str) or not reservation:
        raise DriverError("params.reservation is missing")
    return reservation
