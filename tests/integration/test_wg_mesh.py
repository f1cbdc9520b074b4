"""End to end: real `meshd up` agents, each in its own network namespace, on one bridge,
with wireguard-go. Every pair pings over the IPv4 and IPv6 overlay; a killed agent's
peer is dropped by the others once it is declared dead; restarted, it adopts its
wireguard-go and its tunnels work again with the same addresses; SIGTERM removes the
interface and stops wireguard-go; nothing is left behind.

The underlay is 192.0.2.0/24 (TEST-NET-1) inside namespaces this test creates; names
carry the test's PID (the UAPI socket directory is shared by all namespaces).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.netns import HTTP, Hosts, pid_alive, run, until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)"),
]

TAG = f"{os.getpid() % 100_000}"
N = 5
RUN_ARGS = ("--wg-backend", "userspace", "--profile", "local", "--dns", "off", "--http", HTTP)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Hosts]:
    missing = [t for t in ("wireguard-go", "ip", "ping") if shutil.which(t) is None]
    assert not missing, f"missing {missing}: install wireguard-go iproute2 iputils-ping"
    m = Hosts(tmp_path, N, prefix=f"mwe{TAG}", ifprefix=f"mw{TAG}")
    try:
        m.build()
        yield m
    finally:
        m.teardown()


def test_five_agents_mesh_over_wireguard(mesh: Hosts) -> None:
    t0 = time.monotonic()
    res = mesh.meshd(1, "init", *mesh.node_args(1))
    assert res.returncode == 0, res.stderr
    token = mesh.meshd(1, "token", "--data-dir", str(mesh.datadir(1)), "--uses", "20")
    assert token.returncode == 0, token.stderr
    mesh.start(1, "run", "--data-dir", str(mesh.datadir(1)), *RUN_ARGS)
    until(lambda: mesh.get(1, "/v1/status"), 20, "h1's agent")
    for i in range(2, N + 1):
        mesh.start(
            i, "up", *mesh.node_args(i), "--seed", f"{mesh.underlay(1)}:7946",
            "--token", token.stdout.strip(), *RUN_ARGS,
        )  # fmt: skip
    status = {
        i: until(lambda i=i: mesh.get(i, "/v1/status"), 30, f"h{i}'s agent")
        for i in range(1, N + 1)
    }
    addrs = {i: status[i]["addresses"] for i in status}
    assert len({a["ipv4"] for a in addrs.values()}) == N
    for i, st in status.items():
        wg = st["wireguard"]
        assert wg["backend"] == "userspace" and wg["interface"] == mesh.ifname(i)
        mesh.wg_pids.add(wg["pid"])
    t_up = time.monotonic()

    # Every pair, both families, over the overlay.
    def all_pairs_ping() -> list[tuple[int, int, str]]:
        failed = []
        for i in range(1, N + 1):
            for j in range(1, N + 1):
                if i != j:
                    for fam in ("ipv4", "ipv6"):
                        if not mesh.ping(i, addrs[j][fam]):
                            failed.append((i, j, fam))
        return failed

    until(lambda: not all_pairs_ping() or None, 30, "every pair to ping", step=0.5)
    t_ping = time.monotonic()
    assert all_pairs_ping() == []

    # /v1/members shows live tunnels (stats are read back every few seconds).
    def tunnels_shown() -> list[dict[str, Any]] | None:
        ms = [m for m in mesh.get(2, "/v1/members")["members"] if not m["is_self"]]
        return ms if all(m["connection"] == "direct" for m in ms) else None

    members = until(tunnels_shown, 10, "every tunnel shown as direct on h2")
    assert len(members) == N - 1
    for m in members:
        assert m["state"] == "alive" and m["last_handshake"], m
        assert m["wg_endpoint"].endswith(":51820") and m["rx_bytes"] > 0

    # Kill h5's agent (SIGKILL: no cleanup). Its wireguard-go keeps running; the others
    # drop its peer once they declare it dead.
    victim = N
    key5 = next(m["wg_public_key"] for m in members if m["name"] == f"h{victim}")
    wg5 = status[victim]["wireguard"]["pid"]
    mesh.procs[victim].kill()
    mesh.procs[victim].wait(5)

    def dropped() -> bool:
        for i in range(1, N):
            ms = mesh.get(i, "/v1/members")
            if ms is None:
                return False
            m5 = next(m for m in ms["members"] if m["wg_public_key"] == key5)
            if m5["state"] != "dead" or m5["connection"] is not None:
                return False
        return True

    until(dropped, 30, f"h{victim}'s peer to be dropped everywhere")
    t_dead = time.monotonic()
    assert not mesh.ping(1, addrs[victim]["ipv4"])

    # Restart it: same addresses, adopted wireguard-go, tunnels back.
    mesh.start(victim, "run", "--data-dir", str(mesh.datadir(victim)), *RUN_ARGS)
    st5 = until(lambda: mesh.get(victim, "/v1/status"), 30, "the restarted agent")
    assert st5["addresses"] == addrs[victim]
    assert st5["wireguard"]["adopted"] is True and st5["wireguard"]["pid"] == wg5
    for i in range(1, N):
        for fam in ("ipv4", "ipv6"):
            until(lambda i=i, fam=fam: mesh.ping(i, addrs[victim][fam]), 30, f"h{i} -> h5 {fam}")
            assert mesh.ping(victim, addrs[i][fam])
    t_back = time.monotonic()

    # A clean stop (SIGTERM) leaves no interface and no wireguard-go behind.
    for i in range(1, N + 1):
        mesh.procs[i].send_signal(signal.SIGTERM)
    for i in range(1, N + 1):
        assert mesh.procs[i].wait(15) == 0, mesh.log(i)
    for i in range(1, N + 1):
        wg_pid = status[i]["wireguard"]["pid"]
        until(lambda p=wg_pid: not pid_alive(p), 5, f"h{i}'s wireguard-go to exit")
        assert (
            run("ip", "-n", mesh.ns[i - 1], "link", "show", mesh.ifname(i), check=False).returncode
            != 0
        )
        assert not os.path.exists(f"/var/run/wireguard/{mesh.ifname(i)}.sock")
        assert run("ip", "netns", "pids", mesh.ns[i - 1]).stdout.split() == []
    print(
        f"\n{N} agents: all up {t_up - t0:.1f} s, every pair pinging (v4+v6) "
        f"{t_ping - t_up:.1f} s later; killed agent's peer dropped in {t_dead - t_ping:.1f} s; "
        f"restart to tunnels back {t_back - t_dead:.1f} s"
    )
