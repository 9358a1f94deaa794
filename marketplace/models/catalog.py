from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from marketplace.choices import OfferShape, TermMonths
from marketplace.money import term_price
from provisioning.models import AcceleratorType, Site


class Offer(models.Model):
    """Something a tenant can rent at a site: a node of ``gpus_per_node`` accelerators, or a whole
    rack of such nodes, at an on-demand price per GPU-hour. What is free is derived from the fleet
    (marketplace.selectors.catalog), never stored here."""

    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="offers")
    accelerator_type = models.ForeignKey(AcceleratorType, on_delete=models.PROTECT, related_name="offers")
    shape = models.CharField(max_length=8, choices=OfferShape.choices, default=OfferShape.NODE)
    gpus_per_node = models.PositiveSmallIntegerField(default=8, validators=[MinValueValidator(1)])
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
                fields=["site", "accelerator_type", "shape", "gpus_per_node"], name="offer_unique_shape_per_site"
            ),
            models.CheckConstraint(condition=models.Q(price_per_gpu_hour__gte=0), name="offer_price_non_negative"),
        ]
        indexes = [models.Index(fields=["is_active", "price_per_gpu_hour"], name="offer_active_price_idx")]

    def __str__(self) -> str:
        what = "rack" if self.shape == OfferShape.RACK else "node"
        return f"{self.gpus_per_node}× {self.accelerator_type.model} {what} · {self.site.name}"

    @property
    def price_per_node_hour(self) -> Decimal:
        return self.price_per_gpu_hour * self.gpus_per_node


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
