"""What every benchmark result records about the machine it ran on, and the peak-RSS counters they read.

Versions come from package metadata (importing transformers or deepspeed alone takes seconds), so a benchmark
names exactly what was installed without paying for imports it does not use. Scripts import this module as
`from hostinfo import ...` after putting their own folder on sys.path: the GPU check runs them with `python -P`,
which keeps the script's folder off sys.path, and tests load some of them by file path.
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata


def status_kib(field: str) -> int:
    """One counter of /proc/self/status in KiB: VmRSS (now), VmHWM (peak since start or the last reset), RssAnon..."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def versions(*packages: str) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host(*packages: str) -> dict:
    """Date (UTC), CPU model, cores, memory, Python and the named packages' versions, one flat dict."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "memory_gib": memory_gib(), "python": platform.python_version(),
            **versions(*packages)}
