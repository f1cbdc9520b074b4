"""Real agents on loopback with `--wg-backend memory` (no root): the reconciler is fed
from the node's view, /v1/status names the backend, /v1/members carries tunnel fields,
and a stopped member's peer disappears from the others' WireGuard view."""

from __future__ import annotations

import time
from typing import Any

import pytest

from meshd.demo import LocalCluster

pytestmark = pytest.mark.integration

RUN = ("--wg-backend", "memory", "--profile", "local", "--dns", "off")


def wg(c: LocalCluster, name: str) -> dict[str, Any]:
    return c.get(name, "/v1/status")["wireguard"]  # type: ignore[no-any-return]


def until(probe: Any, within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_memory_backend_follows_membership(cluster: LocalCluster) -> None:
    assert cluster.init("a").returncode == 0
    cluster.start("a", *RUN)
    tok = cluster.token("a", "--uses", "5")
    for name in ("b", "c"):
        res = cluster.join(name, "a", tok)
        assert res.returncode == 0, res.stderr
        cluster.start(name, *RUN)
    cluster.wait_converged(["a", "b", "c"])
    for name in ("a", "b", "c"):
        until(lambda name=name: wg(cluster, name)["reconciler"]["peers"] == 2)
        st = wg(cluster, name)
        assert st["backend"] == "memory" and st["reconciler"]["converged"]
    members = cluster.get("a", "/v1/members")["members"]
    for m in members:
        if m["is_self"]:
            assert m["connection"] == "self"
        else:  # in memory nobody handshakes
            assert m["connection"] == "unreachable" and m["last_handshake"] is None
            assert m["wg_endpoint"] == m["endpoints"][0].rsplit(":", 1)[0] + ":51820"
            assert m["wg_port"] == 51820  # from the member's signed record
            # no handshake, no tunnel: gossip stays on the bootstrap channel
            assert m["gossip_path"] == "underlay" and m["observed_endpoint"] is None
    gp = cluster.get("a", "/v1/status")["gossip_paths"]
    assert gp["tx"]["overlay"] == 0 and gp["tx"]["underlay"] > 0 and gp["fallbacks"] == 0
    cluster.stop("c")
    until(lambda: wg(cluster, "a")["reconciler"]["peers"] == 1, within=30)
    names = {m["name"]: m["connection"] for m in cluster.get("a", "/v1/members")["members"]}
    assert names["c"] is None and names["b"] == "unreachable"
