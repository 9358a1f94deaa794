from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from marketplace.choices import OfferKind, OfferShape, TermMonths
from marketplace.money import term_price
from provisioning.models import AcceleratorType, Site

# GPUs per instance an offer may rent out of a node (besides the whole node, whatever its size): a
# power of two, so that aligned slices nest inside the node's NVLink/PCIe switch islands.
SLICE_SIZES = (1, 2, 4, 8)
# The largest node whose GPUs can be sliced: placement folds a node's held GPUs into one bigint mask.
MAX_SLICED_NODE_GPUS = 32


class Offer(models.Model):
    """Something a tenant can rent at a site, at an on-demand price per GPU-hour: an instance of
    ``gpus_per_instance`` GPUs of one node of ``gpus_per_node`` accelerators (a slice, or the whole
    node when the two are equal), or a whole rack of such nodes. An operator offers several instance
    sizes per site and type as several offers; they share the site's nodes. What is free is derived
    from the fleet (marketplace.selectors.catalog), never stored here."""

    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="offers")
    accelerator_type = models.ForeignKey(AcceleratorType, on_delete=models.PROTECT, related_name="offers")
    shape = models.CharField(max_length=8, choices=OfferShape.choices, default=OfferShape.NODE)
    gpus_per_node = models.PositiveSmallIntegerField(
        default=8, validators=[MinValueValidator(1)], help_text="GPUs of the nodes it runs on (exactly)."
    )
    gpus_per_instance = models.PositiveSmallIntegerField(
        default=8,
        validators=[MinValueValidator(1)],
        help_text="GPUs one instance holds: 1, 2, 4 or 8 of a node, or the whole node (gpus per node).",
    )
    price_per_gpu_hour = models.DecimalField(
        "on-demand price per GPU-hour (USD)",
        max_digits=10,
        decimal_places=4,
        validators=[MinValueValidator(Decimal("0"))],
    )
    max_duration_hours = models.PositiveIntegerField(default=24 * 90, help_text="Longest single reservation.")
    is_active = models.BooleanField(default=True, help_text="Inactive offers are hidden from tenants.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["site", "accelerator_type", "shape"]
        constraints = [
            models.UniqueConstraint(
                fields=["site", "accelerator_type", "shape", "gpus_per_node", "gpus_per_instance"],
                name="offer_unique_shape_per_site",
            ),
            models.CheckConstraint(condition=models.Q(price_per_gpu_hour__gte=0), name="offer_price_non_negative"),
            # An instance is a whole node, or an aligned slice that divides it; a rack is whole nodes.
            models.CheckConstraint(
                condition=models.Q(gpus_per_instance=models.F("gpus_per_node"))
                | models.Q(shape=OfferShape.NODE, gpus_per_instance__in=SLICE_SIZES)
                & models.Q(gpus_per_instance__lt=models.F("gpus_per_node"))
                & models.Q(gpus_per_node__lte=MAX_SLICED_NODE_GPUS),
                name="offer_instance_fits_node",
            ),
        ]
        indexes = [models.Index(fields=["is_active", "price_per_gpu_hour"], name="offer_active_price_idx")]

    def __str__(self) -> str:
        if self.shape == OfferShape.RACK:
            return f"Rack of {self.gpus_per_node}× {self.accelerator_type.model} nodes · {self.site.name}"
        what = "node" if self.is_whole_node else "instance"
        return f"{self.gpus_per_instance}× {self.accelerator_type.model} {what} · {self.site.name}"

    def clean(self) -> None:
        super().clean()
        if self.gpus_per_instance is None or self.gpus_per_node is None:
            return
        if self.shape == OfferShape.RACK and self.gpus_per_instance != self.gpus_per_node:
            raise ValidationError({"gpus_per_instance": "A rack rents whole nodes: GPUs per instance = GPUs per node."})
        if self.gpus_per_instance > self.gpus_per_node:
            raise ValidationError({"gpus_per_instance": "An instance cannot hold more GPUs than its node has."})
        if self.gpus_per_instance < self.gpus_per_node:
            sizes = ", ".join(str(size) for size in SLICE_SIZES)
            if self.gpus_per_instance not in SLICE_SIZES:
                raise ValidationError({"gpus_per_instance": f"A slice of a node holds {sizes} GPUs."})
            if self.gpus_per_node > MAX_SLICED_NODE_GPUS:
                raise ValidationError(
                    {"gpus_per_instance": f"Nodes of more than {MAX_SLICED_NODE_GPUS} GPUs are rented whole."}
                )

    @property
    def is_whole_node(self) -> bool:
        """An instance is the whole node (or a rack of them): it needs nodes no one holds any GPU of."""
        return self.gpus_per_instance == self.gpus_per_node

    @property
    def is_slice(self) -> bool:
        return self.shape == OfferShape.NODE and not self.is_whole_node

    @property
    def kind(self) -> str:
        """A slice, a node or a rack (``OfferKind``): what a tenant gets for one instance."""
        if self.shape == OfferShape.RACK:
            return OfferKind.RACK
        return OfferKind.NODE if self.is_whole_node else OfferKind.SLICE

    def get_kind_display(self) -> str:
        return OfferKind(self.kind).label

    @property
    def price_per_instance_hour(self) -> Decimal:
        return self.price_per_gpu_hour * self.gpus_per_instance


class OfferTermDiscount(models.Model):
    """A discount for committing to a reserved term."""

    offer = models.ForeignKey(Offer, on_delete=models.CASCADE, related_name="term_discounts")
    term_months = models.PositiveSmallIntegerField(choices=TermMonths.choices)
    percent_off = models.DecimalField(
        max_digits=5, decimal_places=2, validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("90"))]
    )

    class Meta:
        ordering = ["offer", "term_months"]
        constraints = [
            models.UniqueConstraint(fields=["offer", "term_months"], name="discount_unique_term"),
            models.CheckConstraint(
                condition=models.Q(percent_off__gte=0, percent_off__lte=90), name="discount_percent_range"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.term_months} mo: {self.percent_off}% off"

    @property
    def price_per_gpu_hour(self) -> Decimal:
        return term_price(self.offer.price_per_gpu_hour, self.percent_off)


IMAGE_SLUG = RegexValidator(
    r"^[a-z0-9][a-z0-9._-]*$", "Lower-case letters, digits, dots, dashes and underscores, from a letter or digit."
)
MAX_IMAGE_STEPS = 32
MAX_STEP_SECONDS = 600


def image_steps_check(steps) -> None:
    """ValueError saying what is wrong with an image's steps (the agent checks them again)."""
    if not isinstance(steps, list) or len(steps) > MAX_IMAGE_STEPS:
        raise ValueError(f"Steps are a list of at most {MAX_IMAGE_STEPS} objects.")
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict) or set(step) - {"name", "run", "seconds"}:
            raise ValueError(f"Step {number} must be an object of name, run (optional) and seconds (optional).")
        name = step.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 80 or not name.isprintable():
            raise ValueError(f"Step {number} needs a name of 1 to 80 printable characters.")
        run = step.get("run")
        if run is not None and (not isinstance(run, list) or not run or not all(isinstance(a, str) for a in run)):
            raise ValueError(f"Step {number} ({name}): run is a program and its arguments (strings).")
        seconds = step.get("seconds", 1)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_STEP_SECONDS:
            raise ValueError(f"Step {number} ({name}): seconds is a number from 0 to {MAX_STEP_SECONDS}.")


class Image(models.Model):
    """What a node or a slice boots into, kept by operators: e.g. "Ubuntu 22.04 · CUDA 12.4 · PyTorch 2.5".
    ``steps`` are what a host driver runs to prepare it, in order: ``{"name", "run" (argv, optional),
    "seconds" (how long the simulated driver pretends it takes, optional)}`` (docs/access.md). It suits
    the accelerator types it names; a reservation of another type cannot take it."""

    slug = models.CharField(
        max_length=64,
        unique=True,
        validators=[IMAGE_SLUG],
        help_text="Lower-case letters, digits, dots, dashes: e.g. ubuntu-22.04-cuda-12.4.",
    )
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    accelerator_types = models.ManyToManyField(
        AcceleratorType, related_name="images", help_text="The accelerators it is built for."
    )
    steps = models.JSONField(default=list, blank=True, help_text="What a host driver runs to prepare it.")
    is_active = models.BooleanField(default=True, help_text="Inactive images are hidden and cannot be chosen.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        try:
            image_steps_check(self.steps)
        except ValueError as error:
            raise ValidationError({"steps": str(error)}) from None


class ImageDefault(models.Model):
    """The image a reservation of an accelerator type gets when it names none: one per type."""

    accelerator_type = models.OneToOneField(AcceleratorType, on_delete=models.CASCADE, related_name="default_image")
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="defaults")

    class Meta:
        ordering = ["accelerator_type"]

    def __str__(self) -> str:
        return f"{self.accelerator_type}: {self.image}"
