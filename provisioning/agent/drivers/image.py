"""The image a node is prepared with for a reservation (``params.image``, docs/agent-protocol.md): its slug
and name, and the steps that make it. A step has a name (reported as ``prepare image: <name>``), the
arguments of a program that does it (``run``, optional: the process driver runs it as the reservation's
account), and how long the simulated driver pretends it takes (``seconds``). Checked whole before
anything is set up."""

from dataclasses import dataclass
from typing import Any

from provisioning.agent.drivers.base import DriverError, Params

DEFAULT_STEP_SECONDS = 1.0
MAX_STEP_SECONDS = 3600.0
MAX_STEPS = 64
STEP_PREFIX = "prepare image: "


@dataclass(frozen=True)
class ImageStep:
    name: str
    run: tuple[str, ...] | None
    seconds: float

    @property
    def progress_step(self) -> str:
        return f"{STEP_PREFIX}{self.name}"


@dataclass(frozen=True)
class Image:
    slug: str
    name: str
    steps: tuple[ImageStep, ...]


def _text(value: Any) -> bool:
    """A non-empty string of one line: it is shown as a progress step."""
    return isinstance(value, str) and bool(value.strip()) and value.isprintable()


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def image_of(params: Params) -> Image | None:
    """``params.image`` checked, or None when the provisioning names no image."""
    image = params.get("image")
    if image is None:
        return None
    if not isinstance(image, dict):
        raise DriverError("params.image must be an object")
    slug, name = image.get("slug"), image.get("name", image.get("slug"))
    if not _text(slug):
        raise DriverError("params.image.slug must be a non-empty string")
    if not _text(name):
        raise DriverError("params.image.name must be a non-empty string")
    steps = image.get("steps", [])
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise DriverError(f"params.image.steps must be a list of at most {MAX_STEPS} steps")
    return Image(slug=slug, name=name, steps=tuple(_step_of(step, number) for number, step in enumerate(steps)))


def _step_of(step: Any, number: int) -> ImageStep:
    where = f"params.image.steps[{number}]"
    if not isinstance(step, dict):
        raise DriverError(f"{where} must be an object")
    if not _text(step.get("name")):
        raise DriverError(f"{where}.name must be a non-empty string of one line")
    run = step.get("run")
    if run is not None and (
        not isinstance(run, list) or not run or not all(isinstance(arg, str) and arg for arg in run)
    ):
        raise DriverError(f"{where}.run must be a non-empty list of non-empty strings (a program's arguments)")
    seconds = step.get("seconds", DEFAULT_STEP_SECONDS)
    if not _number(seconds) or not 0 <= seconds <= MAX_STEP_SECONDS:
        raise DriverError(f"{where}.seconds must be a number of seconds from 0 to {MAX_STEP_SECONDS:g}")
    return ImageStep(name=step["name"], run=None if run is None else tuple(run), seconds=float(seconds))
