"""End to end: real `meshd up` agents, each in its own network namespace, on one bridge,
with wireguard-go, each on its own WireGuard port (published in its signed record).
Every pair pings over the IPv4 and IPv6 overlay; gossip moves onto the tunnels (path
counters), falls back to the bootstrap channel when a tunnel stops carrying it (nftables
drop, then a deleted interface) without anyone being declared dead, and returns; a
killed agent's peer is dropped by the others once it is declared dead; restarted, it
adopts its wireguard-go and its tunnels work again with the same addresses; while an
agent restarts (SIGKILL then adopt, SIGTERM then recreate) two other hosts keep pinging
each other without a gap; SIGTERM removes the interface and stops wireguard-go; nothing
is left behind.

The underlay is 192.0.2.0/24 (TEST-NET-1) inside namespaces this test creates; names
carry the test's PID (the UAPI socket directory is shared by all namespaces).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshd.netns import GOSSIP_PORT, HTTP, Hosts, pid_alive, run, until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)"),
]

TAG = f"{os.getpid() % 100_000}"
N = 5
RUN_ARGS = ("--wg-backend", "userspace", "--profile", "local", "--dns", "off", "--http", HTTP)
#: The host whose agent listens on 0.0.0.0 (the others on their underlay address).
WILDCARD = 2
#: Ping interval of the continuity checks (root may ping this fast).
PING_EVERY = 0.05


def wg_port(i: int) -> int:
    """Every host listens on its own WireGuard port: the port travels in its record."""
    return 51820 + i


def paths(mesh: Hosts, i: int) -> dict[str, Any]:
    st = mesh.get(i, "/v1/status")
    assert st is not None, mesh.log(i)
    return st["gossip_paths"]  # type: ignore[no-any-return]


def member(mesh: Hosts, i: int, name: str) -> dict[str, Any] | None:
    ms = mesh.get(i, "/v1/members")
    if ms is None:
        return None
    return next(m for m in ms["members"] if m["name"] == name)  # type: ignore[no-any-return]


def nft(mesh: Hosts, i: int, script: str) -> None:
    res = subprocess.run(
        mesh.exec_args(i, "nft", "-f", "-"), input=script, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def first_fallback(mesh: Hosts, i: int, name: str, since: float) -> float | None:
    """Wall-clock time of host ``i``'s first logged fallback of gossip to ``name`` after
    ``since`` (the agents log each path change with a UTC timestamp)."""
    pattern = re.compile(
        rf"^(\S+)Z \[warning\s*\] gossip path underlay .*name={name} reason='no answer'"
    )
    for line in (mesh.root / f"h{i}.log").read_text(errors="replace").splitlines():
        if m := pattern.match(line):
            t = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC).timestamp()
            if t >= since:
                return t
    return None


class Pinger:
    """``ping -i PING_EVERY`` in a host, in the background; the longest run of lost
    replies tells how long the path was down."""

    def __init__(self, mesh: Hosts, i: int, addr: str) -> None:
        self.proc = subprocess.Popen(
            mesh.exec_args(i, "ping", "-n", "-i", str(PING_EVERY), "-W", "1", addr),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> tuple[int, int, float]:
        """(sent, received, longest gap in seconds between consecutive replies)."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        seqs = sorted({int(m) for m in re.findall(r"icmp_seq=(\d+) ttl=", out)})
        sent = int(m.group(1)) if (m := re.search(r"(\d+) packets transmitted", out)) else 0
        gap = max((b - a for a, b in itertools.pairwise(seqs)), default=0)
        return sent, len(seqs), round(gap * PING_EVERY, 2)


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
    res = mesh.meshd(1, "init", *mesh.node_args(1), "--wg-port", str(wg_port(1)))
    assert res.returncode == 0, res.stderr
    token = mesh.meshd(1, "token", "--data-dir", str(mesh.datadir(1)), "--uses", "20")
    assert token.returncode == 0, token.stderr
    mesh.start(1, "run", "--data-dir", str(mesh.datadir(1)), *RUN_ARGS)
    until(lambda: mesh.get(1, "/v1/status"), 20, "h1's agent")
    for i in range(2, N + 1):
        # h2 listens on the wildcard (the default): its main socket also takes the
        # overlay IPv4 gossip, which cannot get a socket of its own on the same port
        wildcard = ("--listen", f"0.0.0.0:{GOSSIP_PORT}") if i == WILDCARD else ()
        mesh.start(
            i, "up", *mesh.node_args(i), *wildcard, "--wg-port", str(wg_port(i)),
            "--seed", f"{mesh.underlay(1)}:7946", "--token", token.stdout.strip(), *RUN_ARGS,
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
        assert wg["listen_port"] == wg_port(i)
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

    # /v1/members shows live tunnels (stats are read back every few seconds), each
    # member dialled at the WireGuard port of its own record, and where it is seen from.
    def tunnels_shown() -> list[dict[str, Any]] | None:
        ms = [m for m in mesh.get(2, "/v1/members")["members"] if not m["is_self"]]
        return ms if all(m["connection"] == "direct" and m["seen_from"] for m in ms) else None

    members = until(tunnels_shown, 10, "every tunnel shown as direct on h2")
    assert len(members) == N - 1
    for m in members:
        j = int(m["name"][1:])
        assert m["state"] == "alive" and m["last_handshake"], m
        assert m["wg_port"] == wg_port(j)
        assert m["wg_endpoint"] == f"{mesh.underlay(j)}:{wg_port(j)}" and m["rx_bytes"] > 0
        assert m["seen_from"] == m["wg_endpoint"]  # no NAT here: seen where advertised
        assert m["nat_candidates"][0]["kind"] == "observed"

    # Gossip moves onto the tunnels: every host sends to every member over the overlay.
    until(
        lambda: all(paths(mesh, i)["members_on_overlay"] == N - 1 for i in range(1, N + 1)),
        20,
        "gossip to every member over the overlay",
    )
    before = {i: paths(mesh, i) for i in range(1, N + 1)}
    time.sleep(2.0)
    after = {i: paths(mesh, i) for i in range(1, N + 1)}

    def delta(direction: str, path: str) -> int:
        return sum(after[i][direction][path] - before[i][direction][path] for i in after)

    tx_over, tx_under = delta("tx", "overlay"), delta("tx", "underlay")
    share = tx_over / max(1, tx_over + tx_under)
    assert tx_over > 0 and delta("rx", "overlay") > 0
    assert share > 0.5, (tx_over, tx_under)  # ~1.0 unless the machine is very slow
    for i, a in after.items():
        v4 = f"{addrs[i]['ipv4']}:{GOSSIP_PORT}"
        main = " (main socket)" if i == WILDCARD else ""
        assert a["overlay_listen"] == [v4 + main, f"[{addrs[i]['ipv6']}]:{GOSSIP_PORT}"], a
        assert a["rx"]["overlay"] > 0, (i, a)

    # Kill h3's tunnel path for gossip: nftables drops the gossip port on its WireGuard
    # interface (both ways) while WireGuard itself keeps handshaking, so every tunnel still
    # looks fresh. Everyone falls back to the bootstrap channel; nobody is declared dead.
    third = 3
    fb = {i: after[i]["fallbacks"] for i in after}
    iface = mesh.ifname(third)
    t_cut, wall_cut = time.monotonic(), time.time()
    nft(
        mesh,
        third,
        f"""table inet meshdtest {{
  chain i {{ type filter hook input priority 0; iifname "{iface}" udp dport {GOSSIP_PORT} drop; }}
  chain o {{ type filter hook output priority 0; oifname "{iface}" udp dport {GOSSIP_PORT} drop; }}
}}""",
    )
    others = [i for i in range(1, N + 1) if i != third]
    states_seen: set[str] = set()

    def fell_back() -> bool:
        ok = True
        for i in others:
            m = member(mesh, i, f"h{third}")
            if m is None:
                return False
            states_seen.add(m["state"])
            ok &= m["gossip_path"] == "underlay"
        return ok

    until(fell_back, 20, f"everyone's gossip to h{third} to fall back")
    t_fallback = time.monotonic() - t_cut  # includes polling four hosts
    logged = [first_fallback(mesh, i, f"h{third}", wall_cut) for i in others]
    assert all(t is not None for t in logged), logged
    fallback_logged = max(t for t in logged if t is not None) - wall_cut
    deadline = time.monotonic() + 2.0  # and it stays healthy on the bootstrap channel
    while time.monotonic() < deadline:
        for i in others:
            m = member(mesh, i, f"h{third}")
            if m is not None:
                states_seen.add(m["state"])
        time.sleep(0.2)
    assert "dead" not in states_seen, states_seen
    assert all(paths(mesh, i)["fallbacks"] > fb[i] for i in (*others[:1], third))
    assert mesh.ping(1, addrs[third]["ipv4"])  # WireGuard itself was never touched
    run(*mesh.exec_args(third, "nft", "delete", "table", "inet", "meshdtest"))
    t_fix = time.monotonic()

    def back_on_overlay() -> bool:
        return all(
            (m := member(mesh, i, f"h{third}")) is not None and m["gossip_path"] == "overlay"
            for i in others
        )

    until(back_on_overlay, 60, f"gossip to h{third} back on the overlay", step=0.5)
    t_recover = time.monotonic() - t_fix

    # Delete h3's interface outright: wireguard-go exits and is restarted by the agent,
    # gossip falls back meanwhile, and nobody is declared dead.
    old_wg = status[third]["wireguard"]["pid"]
    run(*mesh.exec_args(third, "ip", "link", "del", iface))
    t_del = time.monotonic()
    st3 = until(
        lambda: (
            (st := mesh.get(third, "/v1/status"))
            and st["wireguard"]["pid"] not in (None, old_wg)
            and st
        ),
        30,
        "h3's wireguard-go to be restarted",
    )
    mesh.wg_pids.add(st3["wireguard"]["pid"])
    status[third] = st3
    until(lambda: mesh.ping(1, addrs[third]["ipv4"]), 30, "h1 -> h3 after the interface came back")
    t_rebuilt = time.monotonic() - t_del
    for i in others:
        m = member(mesh, i, f"h{third}")
        assert m is not None and m["state"] != "dead", m
    until(back_on_overlay, 60, f"gossip to h{third} back on the overlay again", step=0.5)

    # Kill h5's agent (SIGKILL: no cleanup). Its wireguard-go keeps running; the others
    # drop its peer once they declare it dead.
    victim = N
    key5 = next(m["wg_public_key"] for m in members if m["name"] == f"h{victim}")
    wg5 = status[victim]["wireguard"]["pid"]
    mesh.procs[victim].kill()
    mesh.procs[victim].wait(5)
    t_kill = time.monotonic()

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

    # Lifecycle: while h4's agent restarts, h1 and h2 keep pinging each other without a
    # gap, and h4's own tunnels come back (at once when it adopts its wireguard-go).
    restarting = 4
    gaps: dict[str, tuple[int, int, float]] = {}
    for how in ("kill", "term"):
        bystanders = Pinger(mesh, 1, addrs[2]["ipv4"])
        to_restarted = Pinger(mesh, 1, addrs[restarting]["ipv4"])
        time.sleep(0.5)
        proc = mesh.procs[restarting]
        if how == "kill":
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in (0, -signal.SIGKILL), mesh.log(restarting)
        mesh.start(restarting, "run", "--data-dir", str(mesh.datadir(restarting)), *RUN_ARGS)
        st4 = until(lambda: mesh.get(restarting, "/v1/status"), 30, f"h{restarting} restarted")
        assert st4["wireguard"]["adopted"] is (how == "kill")
        mesh.wg_pids.add(st4["wireguard"]["pid"])
        status[restarting] = st4
        for j in (1, 2, 3, 5):
            until(lambda j=j: mesh.ping(restarting, addrs[j]["ipv4"]), 30, f"h4 -> h{j} ({how})")
        time.sleep(0.5)
        gaps[f"h1-h2 ({how})"] = bystanders.stop()
        gaps[f"h1-h4 ({how})"] = to_restarted.stop()
        sent, _got, gap = gaps[f"h1-h2 ({how})"]
        assert sent > 0 and gap <= 1.0, gaps  # a moment at most (it is ~0 unless loaded)
    for j in (1, 2, 3, 5):
        m = member(mesh, j, f"h{restarting}")
        assert m is not None and m["state"] == "alive", m

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
        f"{t_ping - t_up:.1f} s later; gossip over the overlay {share:.1%} "
        f"({tx_over} of {tx_over + tx_under} datagrams in 2 s); gossip cut on h{third}'s "
        f"tunnels: all fell back within {fallback_logged:.2f} s by their logs ({t_fallback:.1f} s "
        f"by polling), states seen {sorted(states_seen)}, "
        f"back on the overlay {t_recover:.1f} s after the repair; interface deleted: tunnels "
        f"back in {t_rebuilt:.1f} s; killed agent's peer dropped in {t_dead - t_kill:.1f} s; "
        f"restart to tunnels back {t_back - t_dead:.1f} s; restart ping (sent, received, "
        f"longest gap s): {gaps}"
    )
