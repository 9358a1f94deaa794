"""The benchmarks' own database: which one, and a fresh copy of it. Shared by every script in bench/."""

import sys
from urllib.parse import urlsplit, urlunsplit


def bench_database_url(given: str | None, default: str) -> str:
    """The database to drop and recreate. A name without "bench" in it is never dropped: the
    benchmark then uses ``<name>_bench`` on the same server."""
    parts = urlsplit(given or default)
    name = parts.path.lstrip("/") or "neocloud"
    if "bench" not in name:
        print(f"Database {name!r} is not a benchmark database; using {name}_bench on the same server.", file=sys.stderr)
        parts = parts._replace(path=f"/{name}_bench")
    return urlunsplit(parts)


def database_recreate(database_url: str) -> None:
    """Drop it (whoever is connected) and create it empty."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def accelerator_types_create() -> list:
    """The benchmarks' two accelerator types (H100 and H200 SXM), with the names NVML gives their GPUs (an
    agent's report is matched by them). Needs Django set up."""
    from provisioning.choices import Vendor
    from provisioning.models import AcceleratorType

    return [
        AcceleratorType.objects.create(
            slug="h100-sxm-80gb",
            vendor=Vendor.NVIDIA,
            model="H100 SXM",
            memory_gib=80,
            tdp_watts=700,
            interconnect="NVLink 4 (900 GB/s)",
            device_name="NVIDIA H100 80GB HBM3",
        ),
        AcceleratorType.objects.create(
            slug="h200-sxm-141gb",
            vendor=Vendor.NVIDIA,
            model="H200 SXM",
            memory_gib=141,
            tdp_watts=700,
            interconnect="NVLink 4 (900 GB/s)",
            device_name="NVIDIA H200",
        ),
    ]
