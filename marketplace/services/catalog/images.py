"""Writes to the image catalog: what nodes and slices boot into, and each accelerator type's default."""

from collections.abc import Iterable

from django.db import transaction

from console.kernel.errors import DomainError, clean_or_refuse, delete_or_refuse
from marketplace.models import Image, ImageDefault
from provisioning.models import AcceleratorType

IMAGE_FIELDS = ("slug", "name", "description", "steps", "is_active")


@transaction.atomic
def image_save(
    *,
    image: Image | None = None,
    accelerator_types: Iterable[AcceleratorType],
    slug: str,
    name: str,
    description: str = "",
    steps: list | None = None,
    is_active: bool = True,
) -> Image:
    """Add an image (``image`` None) or change one. Reservations already made keep the image they named;
    what its steps are is read when a node is provisioned."""
    image = image or Image()
    image.slug, image.name, image.description, image.is_active = slug, name, description, is_active
    image.steps = [] if steps is None else steps
    clean_or_refuse(image)
    image.save()
    types = list(accelerator_types)
    if not types:
        raise DomainError("An image suits at least one accelerator type.", fields={"accelerator_types": ["Pick one."]})
    image.accelerator_types.set(types)
    unsuited = ImageDefault.objects.filter(image=image).exclude(accelerator_type__in=types)
    if unsuited.exists():
        raise DomainError(
            f"{image.name} is the default for {', '.join(str(d.accelerator_type) for d in unsuited)}; "
            "pick another default for those first.",
            fields={"accelerator_types": ["It is the default of a type it would no longer suit."]},
        )
    return image


def image_delete(*, image: Image) -> None:
    """Only an image no reservation named; one that was is made inactive instead."""
    delete_or_refuse(image, noun="image")


@transaction.atomic
def image_default_set(*, accelerator_type: AcceleratorType, image: Image) -> ImageDefault:
    """The image reservations of ``accelerator_type`` get when they name none."""
    if not image.accelerator_types.filter(pk=accelerator_type.pk).exists():
        raise DomainError(
            f"{image.name} is not built for {accelerator_type}.", fields={"accelerator_type": ["Not suited."]}
        )
    default, _ = ImageDefault.objects.update_or_create(accelerator_type=accelerator_type, defaults={"image": image})
    return default


def image_default_remove(*, accelerator_type: AcceleratorType) -> bool:
    deleted, _ = ImageDefault.objects.filter(accelerator_type=accelerator_type).delete()
    return bool(deleted)
