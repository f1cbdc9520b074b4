"""CPU time and memory of a process from /proc (Linux), for the agent-cost benchmarks.

RSS counts every resident page the process maps, shared library pages included, so N
agents on one machine cost less than N times the RSS; PSS (``smaps_rollup``) divides
each shared page among the processes that map it and is the fairer per-agent figure.
"""

from __future__ import annotations

import os
from typing import Final

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (s); None once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state (field 3 of stat(5)); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int] | None:
    """VmRSS, RssAnon, RssFile and VmHWM from ``status``, Pss from ``smaps_rollup`` (KiB)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return out
