from .fleet import NODE_TRANSITIONS, Gpu, Node, NodeStateChange, Rack, Site
from .hardware import AcceleratorType

__all__ = ["NODE_TRANSITIONS", "AcceleratorType", "Gpu", "Node", "NodeStateChange", "Rack", "Site"]
