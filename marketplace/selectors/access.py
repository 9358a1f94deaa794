"""Reads of the way into a reservation (docs/access.md): the image catalog, and how to connect to each of
a reservation's nodes -- what its agent answered when it set up access there."""

import shlex

from django.db.models import Prefetch, QuerySet

from console.kernel.errors import DomainError
from marketplace.choices import AccessStatus, ReservationState
from marketplace.models import Image, ImageDefault, Offer, Reservation
from provisioning.choices import CommandKind, CommandState
from provisioning.models import NodeCommand

S = ReservationState


def image_list(*, accelerator_type_id: int | None = None) -> QuerySet[Image]:
    """The active images, with the accelerators each suits and those it is the default for."""
    images = Image.objects.filter(is_active=True).prefetch_related(
        "accelerator_types", Prefetch("defaults", queryset=ImageDefault.objects.select_related("accelerator_type"))
    )
    if accelerator_type_id is not None:
        images = images.filter(accelerator_types=accelerator_type_id)
    return images.order_by("name")


def image_for(*, offer: Offer, slug: str | None) -> Image | None:
    """The image a reservation of ``offer`` boots into: the one named (it must be active and suit the
    offer's accelerator), else the type's default, else the first active image suiting it, else None."""
    accelerator = offer.accelerator_type
    suiting = Image.objects.filter(is_active=True, accelerator_types=accelerator)
    if slug:
        image = suiting.filter(slug=slug).first()
        if image is None:
            known = ", ".join(suiting.order_by("slug").values_list("slug", flat=True)) or "none"
            message = f"No image {slug!r} for {accelerator.model}; the images for it are: {known}."
            raise DomainError(message, code="unknown_image", fields={"image": [message]})
        return image
    default = ImageDefault.objects.filter(accelerator_type=accelerator, image__is_active=True).first()
    return default.image if default is not None else suiting.order_by("name").first()


def connect_command(*, host: str, port: int, user: str) -> str:
    """What a tenant types: OpenSSH's, the port first so it copies into any shell."""
    return f"ssh -p {int(port)} {shlex.quote(user)}@{shlex.quote(host)}"


def reservation_access(*, reservation: Reservation) -> dict:
    """How to get into ``reservation``: its status (``none``: it has no access, an endpoint's replica;
    ``waiting``: not set up yet; ``ready``; ``ended``), a sentence saying so, its image and keys, and per
    node where its SSH server listens once the node's agent has set it up."""
    keys = [
        {
            "id": str(key.pk),
            "name": key.name,
            "fingerprint": key.fingerprint,
            "owner": key.owner.email if key.owner else None,
        }
        for key in reservation.ssh_keys.select_related("owner").order_by("created_at")
    ]
    image = reservation.image
    block = {
        "image": None if image is None else {"slug": image.slug, "name": image.name},
        "keys": keys,
        "nodes": [],
    }
    if not reservation.has_access:
        return {**block, "status": AccessStatus.NONE, "message": "This reservation has no SSH access."}
    if reservation.state in (S.RELEASING, S.COMPLETED, S.CANCELLED, S.FAILED):
        return {
            **block,
            "status": AccessStatus.ENDED,
            "message": f"The reservation is {reservation.state}: its access is gone.",
        }
    if reservation.state == S.PENDING:
        message = "Access is set up when its nodes are provisioned, at its start."
        return {**block, "status": AccessStatus.WAITING, "message": message}
    provisioned = {
        command.node_id: command
        for command in NodeCommand.objects.filter(correlation_id=reservation.pk, kind=CommandKind.PROVISION)
    }
    nodes = []
    for allocation in reservation.allocations.filter(live=True).select_related("node").order_by("node__hostname"):
        nodes.append(_node_access(allocation.node.hostname, provisioned.get(allocation.node_id)))
    ready = bool(nodes) and all(node["ready"] for node in nodes) and reservation.state == S.ACTIVE
    if ready:
        message = "Connect with one of its keys." if keys else "No key is installed: add one to log in."
    else:
        message = "Its nodes are being provisioned; the connect command appears when each is ready."
    return {
        **block,
        "status": AccessStatus.READY if ready else AccessStatus.WAITING,
        "message": message,
        "nodes": nodes,
    }


def _node_access(hostname: str, command: NodeCommand | None) -> dict:
    node = {
        "node": hostname,
        "ready": False,
        "host": None,
        "port": None,
        "user": None,
        "command": None,
        "host_key": None,
    }
    if command is None or command.state != CommandState.SUCCEEDED:
        step = command.progress_step if command is not None else ""
        return {**node, "message": f"Being provisioned{f' ({step})' if step else ''}."}
    served = (command.result or {}).get("access") or {}
    if not {"host", "port", "user"} <= served.keys():
        return {**node, "message": "This node's agent set up no SSH access (it may be older than the console)."}
    return {
        **node,
        "ready": True,
        "host": served["host"],
        "port": served["port"],
        "user": served["user"],
        "command": connect_command(host=served["host"], port=served["port"], user=served["user"]),
        "host_key": served.get("host_key"),
        "message": "Ready.",
    }
