"""Loaded by every Python process started with bench/gc_probe on PYTHONPATH (bench/telemetry.py puts it
only on the ASGI server's): logs each garbage collection that takes ``BENCH_GC_PROBE_MS`` (default 10)
or more, as one line on stderr, so the benchmark can line pauses up with latency spikes.

    [gc-probe] pid=1234 at=1795760000.123 generation=2 ms=812.4 collected=15

Costs two clock reads per collection; changes nothing else."""

import gc
import os
import sys
import time

_threshold_s = float(os.environ.get("BENCH_GC_PROBE_MS", "10")) / 1000
_started = [0.0]


def _probe(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    elapsed = time.perf_counter() - _started[0]
    if elapsed >= _threshold_s:
        sys.stderr.write(
            f"[gc-probe] pid={os.getpid()} at={time.time():.3f} generation={info.get('generation')} "
            f"ms={elapsed * 1000:.1f} collected={info.get('collected')}\n"
        )
        sys.stderr.flush()


gc.callbacks.append(_probe)


def _freeze(signum, frame):
    """What-if (BENCH_GC_FREEZE_ON_SIGNAL=1): on SIGUSR1, collect once and move every object alive now
    into the permanent generation (gc.freeze), so later full collections no longer traverse them."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    sys.stderr.write(
        f"[gc-probe] pid={os.getpid()} at={time.time():.3f} froze={gc.get_freeze_count()} "
        f"ms={(time.perf_counter() - started) * 1000:.1f}\n"
    )
    sys.stderr.flush()


if os.environ.get("BENCH_GC_FREEZE_ON_SIGNAL") == "1":
    import signal

    signal.signal(signal.SIGUSR1, _freeze)
