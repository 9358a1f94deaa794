from django.db import models

from provisioning.choices import Purpose, Vendor


class AcceleratorType(models.Model):
    """A kind of accelerator the fleet holds. It lives with the fleet, not the catalog, because every
    GPU names its type and `provisioning` never imports `marketplace`; the catalog sells by it."""

    slug = models.SlugField(unique=True, help_text="Stable identifier, e.g. h100-sxm-80gb.")
    vendor = models.CharField(max_length=16, choices=Vendor.choices)
    model = models.CharField(max_length=64, help_text="Marketing name, e.g. H100 SXM.")
    memory_gib = models.PositiveIntegerField()
    tdp_watts = models.PositiveIntegerField("TDP (W)")
    interconnect = models.CharField(max_length=64, help_text="e.g. NVLink 4 (900 GB/s), Infinity Fabric, PCIe 5.")
    purpose = models.CharField(max_length=16, choices=Purpose.choices, default=Purpose.BOTH)
    device_name = models.CharField(
        max_length=96, blank=True, help_text="Name the driver reports (NVML's nvmlDeviceGetName), to match inventory."
    )

    class Meta:
        ordering = ["vendor", "model", "memory_gib"]

    def __str__(self) -> str:
        return f"{self.get_vendor_display()} {self.model} {self.memory_gib} GiB"
