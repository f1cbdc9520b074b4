"""End to end: real `meshd up` agents, each in its own network namespace, on one bridge,
with wireguard-go. Every pair pings over the IPv4 and IPv6 overlay; a killed agent's
peer is dropped by the others once it is declared dead; restarted, it adopts its
wireguard-go and its tunnels work again with the same addresses; SIGTERM removes the
interface and stops wireguard-go; nothing is left behind.

The underlay is 192.0.2.0/24 (TEST-NET-1) inside namespaces this test creates; names
carry the test's PID (the UAPI socket directory is shared by all namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)"),
]

TAG = f"{os.getpid() % 100_000}"
N = 5
HTTP = "127.0.0.1:7947"


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def until(probe: Callable[[], Any], within: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {within:g} s waiting for {what} (last: {last!r})")


class Mesh:
    """N namespaces on a bridge (in its own namespace), one agent per namespace."""

    def __init__(self, root: Path, n: int) -> None:
        self.root = root
        self.n = n
        self.bridge_ns = f"mwe{TAG}br"
        self.ns = [f"mwe{TAG}h{i}" for i in range(1, n + 1)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.wg_pids: set[int] = set()
        self.logs: dict[int, Any] = {}

    # -- topology ---------------------------------------------------------------------

    def build(self) -> None:
        run("ip", "netns", "add", self.bridge_ns)
        run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ns, 1):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run(
                "ip", "link", "add", "eth0", "netns", ns,
                "type", "veth", "peer", "name", f"p{i}", "netns", self.bridge_ns,
            )  # fmt: skip
            run("ip", "-n", self.bridge_ns, "link", "set", f"p{i}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.underlay(i)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")

    def teardown(self) -> None:
        for i, proc in self.procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if i in self.logs:
                self.logs[i].close()
        for ns in [*self.ns, self.bridge_ns]:
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for pid in self.wg_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for ns in [*self.ns, self.bridge_ns]:
            run("ip", "netns", "del", ns, check=False)
        for i in range(1, self.n + 1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/var/run/wireguard/{self.ifname(i)}.sock")

    @staticmethod
    def underlay(i: int) -> str:
        return f"192.0.2.{i}"

    @staticmethod
    def ifname(i: int) -> str:
        return f"mw{TAG}h{i}"

    def datadir(self, i: int) -> Path:
        return self.root / f"h{i}"

    # -- agents -----------------------------------------------------------------------

    def meshd(self, i: int, *args: str) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns[i - 1], sys.executable, "-m", "meshd", *args)

    def start(self, i: int, *args: str) -> None:
        self.logs[i] = open(self.root / f"h{i}.log", "ab")  # noqa: SIM115
        self.procs[i] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[i - 1], sys.executable, "-m", "meshd", *args],
            stdout=self.logs[i],
            stderr=subprocess.STDOUT,
        )

    def node_args(self, i: int) -> list[str]:
        addr = self.underlay(i)
        return [
            "--data-dir", str(self.datadir(i)), "--name", f"h{i}",
            "--listen", f"{addr}:7946", "--advertise", f"{addr}:7946",
            "--interface", self.ifname(i),
        ]  # fmt: skip

    @staticmethod
    def run_args() -> list[str]:
        return ["--wg-backend", "userspace", "--profile", "local", "--dns", "off", "--http", HTTP]

    def get(self, i: int, path: str) -> Any:
        code = (
            "import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
        )
        res = run(
            "ip", "netns", "exec", self.ns[i - 1], sys.executable, "-c", code,
            f"http://{HTTP}{path}", check=False,
        )  # fmt: skip
        return json.loads(res.stdout) if res.returncode == 0 else None

    def ping(self, i: int, addr: str) -> bool:
        res = run(
            "ip", "netns", "exec", self.ns[i - 1], "ping", "-c", "1", "-W", "1", addr, check=False
        )
        return res.returncode == 0

    def log(self, i: int) -> str:
        return (self.root / f"h{i}.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    missing = [t for t in ("wireguard-go", "ip", "ping") if shutil.which(t) is None]
    assert not missing, f"missing {missing}: install wireguard-go iproute2 iputils-ping"
    m = Mesh(tmp_path, N)
    try:
        m.build()
        yield m
    finally:
        m.teardown()


def test_five_agents_mesh_over_wireguard(mesh: Mesh) -> None:
    t0 = time.monotonic()
    res = mesh.meshd(1, "init", *mesh.node_args(1))
    assert res.returncode == 0, res.stderr
    token = mesh.meshd(1, "token", "--data-dir", str(mesh.datadir(1)), "--uses", "20")
    assert token.returncode == 0, token.stderr
    mesh.start(1, "run", "--data-dir", str(mesh.datadir(1)), *mesh.run_args())
    until(lambda: mesh.get(1, "/v1/status"), 20, "h1's agent")
    for i in range(2, N + 1):
        mesh.start(
            i, "up", *mesh.node_args(i), "--seed", f"{mesh.underlay(1)}:7946",
            "--token", token.stdout.strip(), *mesh.run_args(),
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
    mesh.start(victim, "run", "--data-dir", str(mesh.datadir(victim)), *mesh.run_args())
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
        until(lambda p=wg_pid: not alive(p), 5, f"h{i}'s wireguard-go to exit")
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
