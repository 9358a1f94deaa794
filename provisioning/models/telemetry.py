from django.db import models

from .fleet import Gpu


class GpuRollup(models.Model):
    """One GPU's telemetry over one minute, merged from every batch that arrived for it: sums and counts
    (so partial minutes from several flushes or server processes merge exactly), maxima, and the energy
    the GPU's counter advanced by during the minute. Raw samples are not kept."""

    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, related_name="rollups")
    minute = models.DateTimeField()
    samples = models.PositiveIntegerField(default=0)
    util_n = models.PositiveIntegerField(default=0)
    util_sum = models.FloatField(default=0)
    util_max = models.FloatField(null=True)
    power_n = models.PositiveIntegerField(default=0)
    power_sum = models.FloatField(default=0)
    power_max = models.FloatField(null=True)
    temp_max = models.FloatField(null=True)
    fb_used_max = models.FloatField(null=True)
    energy_mj = models.BigIntegerField(default=0, help_text="Energy counter delta within the minute (mJ).")

    class Meta:
        ordering = ["gpu", "minute"]
        constraints = [models.UniqueConstraint(fields=["gpu", "minute"], name="rollup_one_per_gpu_minute")]
        indexes = [models.Index(fields=["minute"], name="rollup_minute_idx")]

    def __str__(self) -> str:
        return f"{self.gpu} @ {self.minute:%Y-%m-%d %H:%M}"

    @property
    def util_mean(self) -> float | None:
        return self.util_sum / self.util_n if self.util_n else None

    @property
    def power_mean(self) -> float | None:
        return self.power_sum / self.power_n if self.power_n else None
