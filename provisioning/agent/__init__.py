"""The node agent (`neocloud-agent`): runs on each GPU host, speaks docs/agent-protocol.md to the console
over one outbound WebSocket, reports the GPUs through a backend (NVML or simulated) and applies commands
through a host driver (simulated or a local process).

It imports only the standard library, ``websockets`` and (lazily, in the NVML backend) ``pynvml``, so it
can be installed alone on a GPU host; tests/agent/test_isolation.py holds it to that."""

__version__ = "0.1.0"
