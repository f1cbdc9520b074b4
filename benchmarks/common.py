"""Shared helpers for the benchmarks: summary statistics, machine info, JSON output.

Benchmarks report numbers, never pass/fail, so everything here is about making
the numbers comparable between runs: the same statistics everywhere, the machine
they came from, and one JSON file per benchmark under ``benchmarks/results/``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def summarise(samples: Sequence[float]) -> dict[str, Any]:
    """Median, p90, min, max and count of ``samples``, so every benchmark reports alike.

    p90 uses linear interpolation between order statistics (``statistics.quantiles``,
    inclusive method): with 15 samples it lies between the 13th and 14th smallest.
    """
    if not samples:
        return {"n": 0, "median": None, "p90": None, "min": None, "max": None}
    ordered = sorted(samples)
    p90 = (
        statistics.quantiles(ordered, n=10, method="inclusive")[8]
        if len(ordered) > 1
        else ordered[0]
    )
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p90": p90,
        "min": ordered[0],
        "max": ordered[-1],
    }


def machine_info() -> dict[str, Any]:
    """What a figure depends on besides the code: CPUs, Python, OS, library versions."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "libraries": _library_versions(),
    }
    with contextlib.suppress(AttributeError, OSError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    commit = _git(["rev-parse", "--short", "HEAD"])
    if commit:
        info["git_commit"] = commit
        info["git_dirty"] = bool(_git(["status", "--porcelain", "--untracked-files=no"]))
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: a busy machine explains a slow or noisy run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo (Linux); None elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _library_versions() -> dict[str, str]:
    """Versions of the libraries that do the heavy lifting (crypto, msgpack)."""
    from importlib import metadata

    out = {}
    for name in ("cryptography", "msgpack", "meshd"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _git(args: list[str]) -> str | None:
    """Output of a read-only git command in this checkout; None outside one."""
    try:
        res = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def timestamp() -> str:
    """UTC time of the run, ISO 8601, so results files sort and compare."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_json(name: str, data: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<name>.json`` (creating the git-ignored directory)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic GC out of a timed section (as ``timeit`` does)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def one_cpu() -> Iterator[int | None]:
    """Pin this process to one CPU for a per-core figure, and restore the mask afterwards.

    The highest-numbered allowed CPU is used; yields it, or None where affinity is
    not supported. Restoring matters: child processes (the join benchmark's agents)
    inherit the mask.
    """
    try:
        before = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        yield None
        return
    cpu = max(before)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        yield None
        return
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)
