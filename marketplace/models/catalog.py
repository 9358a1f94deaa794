from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
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
