#!/usr/bin/env python
"""GPU check (issue 4): run the node agent's ``nvml`` backend once, as it would run on a GPU host, and
print its inventory, one sample and the cost of each NVML reading as JSON.

    .venv/bin/python bench/gpu_check.py                  # the real GPU, through nvidia-ml-py
    .venv/bin/python bench/gpu_check.py --backend simulated   # the replayed H100, for comparison

On a host without an NVIDIA driver it exits 2 and says so (NVMLError_LibraryNotFound), which is the
agent's behaviour too. Results from real GPUs are recorded in docs/gpu-check.md."""

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="nvml", choices=["nvml", "simulated"])
    parser.add_argument("--calls", type=int, default=200, help="calls per reading when timing NVML")
    args = parser.parse_args()
    # The agent's own command, so this measures exactly what runs on a host.
    command = [
        sys.executable,
        "-m",
        "provisioning.agent.cli",
        "gpu-check",
        "--backend",
        args.backend,
        "--calls",
        str(args.calls),
    ]
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
