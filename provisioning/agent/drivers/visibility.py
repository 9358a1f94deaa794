"""Which GPUs a tenant's workload may see: per accelerator vendor (``params.gpu_vendor``, the console's
vendor slug), the environment variables its runtime reads to hide every other device of the host. This
is the one table of them; a vendor missing here is one the agent cannot confine a workload for, so its
provisioning is refused rather than run with every GPU of the node in sight, other tenants' included.

Indices are the agent's, as its inventory (NVML) numbers the GPUs. Two runtimes need more than the
indices for that to hold:

- CUDA enumerates the fastest device first by default, NVML by PCI bus id; ``CUDA_DEVICE_ORDER`` makes
  CUDA number them as NVML does, so ``CUDA_VISIBLE_DEVICES`` names the GPUs the console placed.
- ROCm applies ``ROCR_VISIBLE_DEVICES`` first and renumbers what is left from 0, then applies
  ``HIP_VISIBLE_DEVICES`` to those: so ROCR gets the host's indices and HIP the renumbered ones (the
  host's indices in HIP would name devices ROCR already hid, and the workload would see none).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_VENDOR = "nvidia"  # consoles before GPU slices sent no vendor: every node they placed was NVIDIA


@dataclass(frozen=True)
class Visibility:
    host_indices: tuple[str, ...]  # set to the GPUs' indices as the agent numbers them
    own_indices: tuple[str, ...] = ()  # set to 0..n-1: read after the first have renumbered the devices
    fixed: dict[str, str] = field(default_factory=dict)


VISIBILITY: dict[str, Visibility] = {
    "nvidia": Visibility(
        host_indices=("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"), fixed={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    ),
    "amd": Visibility(host_indices=("ROCR_VISIBLE_DEVICES",), own_indices=("HIP_VISIBLE_DEVICES",)),
    "intel": Visibility(host_indices=("HABANA_VISIBLE_MODULES",)),  # Gaudi: indices are module ids
}


def visibility_environment(vendor: str, gpus: Sequence[int]) -> dict[str, str]:
    """The variables that show a workload ``gpus`` of a ``vendor`` host and nothing else, plus
    ``NEOCLOUD_GPUS`` (the host's indices) whatever the vendor. ``vendor`` is one of VISIBILITY's
    (``drivers.base.gpu_vendor_of`` checked it)."""
    visibility = VISIBILITY[vendor]
    host = ",".join(str(index) for index in gpus)
    own = ",".join(str(index) for index in range(len(gpus)))
    return {
        "NEOCLOUD_GPUS": host,
        **dict.fromkeys(visibility.host_indices, host),
        **dict.fromkeys(visibility.own_indices, own),
        **visibility.fixed,
    }
