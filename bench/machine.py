"""What every benchmark records about the machine it ran on (docs/benchmarks.md quotes it)."""

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path


def _proc_field(path: str, match, parse, default):
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return default
    return next((parse(line) for line in lines if match(line)), default)


def describe_machine() -> dict:
    """Date, CPUs, memory, kernel, Python and PostgreSQL (through Django's connection)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres = cursor.fetchone()[0]
    memory_kib = _proc_field(
        "/proc/meminfo", lambda line: line.startswith("MemTotal"), lambda line: int(line.split()[1]), 0
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "date_local": subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip(),
        "cpus": os.cpu_count(),
        "cpu_model": _proc_field(
            "/proc/cpuinfo",
            lambda line: "model name" in line,
            lambda line: line.split(":", 1)[1].strip(),
            platform.processor() or "unknown",
        ),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": postgres,
    }
