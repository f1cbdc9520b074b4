"""The DNS benchmark's bookkeeping (benchmarks/dns.py), without dnsperf: slices taken in
turn, merged per server, steal attributed to the server that ran, quiet rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import dns


def test_slices_alternate_and_merge_per_server(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    ticks = iter(range(0, 10_000, 10))

    def fake_dnsperf(port: int, data: Path, seconds: float, rate: int | None) -> dict[str, Any]:
        calls.append(port)
        lat = [1.0] * 99 + [5.0] if port == 1 else [0.1] * 100
        return {"sent": 100, "completed": 100, "lost": 0, "rcodes": {"NOERROR": 100},
                "latencies": lat}  # fmt: skip

    def fake_ticks() -> tuple[int, int]:
        t = next(ticks)
        return t // 10, t  # a tenth of every interval stolen

    monkeypatch.setattr(dns, "dnsperf", fake_dnsperf)
    monkeypatch.setattr(dns, "cpu_ticks", fake_ticks)
    out = dns.fixed_rate({"meshd": 1, "dnsmasq": 2}, Path("q"), 5.0)
    assert calls == [1, 2] * dns.SLICES
    assert out["meshd"]["sent"] == 100 * dns.SLICES and out["meshd"]["rcodes"] == {
        "NOERROR": 100 * dns.SLICES
    }
    assert out["meshd"]["latency_ms"]["p99"] == 5.0 and out["dnsmasq"]["latency_ms"]["p99"] == 0.1
    assert out["meshd"]["slice_p99_ms"] == [5.0] * dns.SLICES
    assert out["meshd"]["steal_pct"] == 10.0 and out["dnsmasq"]["steal_pct"] == 10.0


def test_quiet_rounds_need_low_steal_for_both_servers() -> None:
    def side(steal: float | None) -> dict[str, Any]:
        return {"fixed_rate": {"steal_pct": steal, "latency_ms": {"n": 10, "p99": 1.0}}}

    rounds = [
        {"meshd": side(1.0), "dnsmasq": side(2.0)},
        {"meshd": side(1.0), "dnsmasq": side(30.0)},
        {"meshd": side(None), "dnsmasq": side(1.0)},
    ]
    assert dns.quiet_rounds(rounds) == rounds[:1]


def test_cpu_ticks_reads_the_steal_column() -> None:
    steal, total = dns.cpu_ticks()
    assert 0 <= steal <= total
