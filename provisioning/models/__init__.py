from .agents import COMMAND_TRANSITIONS, UNFINISHED, BootstrapToken, NodeCommand, NodeCredential
from .fleet import NODE_TRANSITIONS, Gpu, Node, NodeStateChange, Rack, Site
from .hardware import AcceleratorType

__all__ = [
    "COMMAND_TRANSITIONS",
    "NODE_TRANSITIONS",
    "UNFINISHED",
    "AcceleratorType",
    "BootstrapToken",
    "Gpu",
    "Node",
    "NodeCommand",
    "NodeCredential",
    "NodeStateChange",
    "Rack",
    "Site",
]
