"""The machine a timing ran on, for speed and end-to-end reports (``validate speed``, ``benchmark``)."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["cpuinfo", "loadavg", "machine_info"]


def cpuinfo() -> dict[str, Any]:
    """First processor's fields of /proc/cpuinfo that identify the CPU (empty off Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_vendor": fields.get("vendor_id"),
        "cpu_family": fields.get("cpu family"),
        "cpu_model_number": fields.get("model"),
        "cpu_mhz": fields.get("cpu MHz"),
        "cpu_cores_per_socket": fields.get("cpu cores"),
        "cpu_simd": sorted(
            f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
        ),
        "cpu_model": fields.get("model name"),
    }


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(load_start: float | None) -> dict[str, Any]:
    """What a timing report records about the machine: load average at start (``load_start``) and now, the
    CPU (:func:`cpuinfo`), the usable cores, the platform and the Python version."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    info = cpuinfo()
    return {
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        **info,
        "cpu_model": info.get("cpu_model") or platform.processor() or platform.machine() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
