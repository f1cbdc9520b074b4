"""The WireGuard benchmarks' plumbing: ``--only wg`` selects them, and a two-agent
``wg_mesh`` run in network namespaces (raw-socket pings, status polling, teardown)
yields a complete, JSON-serialisable result and leaves no namespace behind. The
figures themselves are the benchmark's business (``make bench-wg``), not this test's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks import run as bench_run
from benchmarks import wg_mesh
from meshd.netns import run


def test_wg_group_is_opt_in_and_selectable() -> None:
    assert not {"wg_mesh", "wg_iperf", "agent_idle"} & set(bench_run.selected(None))
    assert bench_run.selected(["wg"]) == ["wg_mesh", "wg_iperf", "agent_idle"]
    assert bench_run.selected(["records", "wg_iperf"]) == ["records", "wg_iperf"]
    assert bench_run.build_parser().parse_args(["--only", "wg"]).only == ["wg"]


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)")
@pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")
def test_two_agent_wg_mesh_run(tmp_path: Path) -> None:
    settings = wg_mesh.Settings(nodes=2, runs=1, backend="userspace", profile="local")
    res = wg_mesh.run(settings=settings)
    assert res["errors"] == [], res["errors"]
    (r,) = res["runs"]
    assert r["pairs"] == 4 and r["confirmed_by_ping"] and r["backends"] == ["userspace"]
    assert 0 < r["init_s"] < r["seed_ready_s"] <= r["all_joined_s"]
    assert r["all_pinging_s"] == max(r["per_family_s"].values())
    json.loads(json.dumps(res))
    assert "every pair pings v4+v6" in wg_mesh.format_summary(res)
    left = [
        ns
        for ns in run("ip", "netns", "list").stdout.split()
        if ns.startswith(f"wb{wg_mesh.tag()}")
    ]
    assert left == []
