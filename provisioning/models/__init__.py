from .agents import COMMAND_TRANSITIONS, UNFINISHED, BootstrapToken, NodeCommand, NodeCredential
from .fleet import NODE_TRANSITIONS, Gpu, Node, NodeStateChange, Rack, RegionSiteLatency, Site
from .hardware import AcceleratorType
from .telemetry import GpuRollup

__all__ = [
    "COMMAND_TRANSITIONS",
    "NODE_TRANSITIONS",
    "UNFINISHED",
    "AcceleratorType",
    "BootstrapToken",
    "Gpu",
    "GpuRollup",
    "Node",
    "NodeCommand",
    "NodeCredential",
    "NodeStateChange",
    "Rack",
    "RegionSiteLatency",
    "Site",
]
