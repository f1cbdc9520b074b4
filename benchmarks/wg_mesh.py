"""Time from starting N ``meshd`` agents to every pair pinging over the overlay (v4 and v6).

Each agent runs in its own network namespace (``meshd.netns.Hosts``: namespaces on one
bridge, underlay 192.0.2.0/24) with the ``userspace`` backend (wireguard-go); this
machine has no WireGuard kernel module (``modprobe wireguard`` fails, ``ip link add type
wireguard`` says "Unknown device type"), so the kernel backend is measured only where
:func:`kernel_wireguard` finds it. One run:

1. ``meshd init`` in host 1, ``meshd token``, ``meshd run`` in host 1; wait until its
   debug endpoint answers;
2. ``meshd up --seed h1 --token ...`` in hosts 2..N, all started at once;
3. every host pings every other host's overlay IPv4 and IPv6 address until each of the
   ``N*(N-1)*2`` (source, target, family) triples has had an echo reply.

The clock starts just before ``meshd init``. The pings are ICMP echo requests sent
from raw sockets opened inside each namespace by this process (one v4 and one v6
socket per host, repeated every :data:`PING_INTERVAL_S` per triple until answered),
so the probe costs no process start-ups and resolves the time of each triple's first
reply to about a quarter of a second; one ``ping`` per family confirms the result at
the end. A fresh set of namespaces per run; everything started is killed by PID and
the namespaces deleted however the run ends.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks.common import summarise
from benchmarks.procstat import cpu_seconds
from meshd import netns
from meshd.demo import in_netns
from meshd.netns import GOSSIP_PORT, HTTP, Hosts

NAME: Final = "wg_mesh"
#: Every unanswered (source, target, family) triple is probed this often.
PING_INTERVAL_S: Final = 0.25
#: A run that has not reached every pair by then is reported as failed.
RUN_TIMEOUT_S: Final = 180.0
FAMILIES: Final = ("ipv4", "ipv6")


@dataclass(frozen=True)
class Settings:
    nodes: int
    runs: int
    backend: str  # "userspace" or "kernel"
    profile: str  # the gossip timer profile every agent runs with

    @classmethod
    def for_mode(cls, quick: bool, backend: str = "userspace") -> Settings:
        return cls(nodes=10, runs=2 if quick else 5, backend=backend, profile="lan")


def require_root() -> None:
    """These benchmarks build network namespaces and TUN devices: root and tools needed."""
    if os.geteuid() != 0:
        raise RuntimeError("needs root (network namespaces, TUN devices)")
    missing = [t for t in ("ip", "ping", "wireguard-go", "wg") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} (Debian: wireguard-go wireguard-tools)")


def kernel_wireguard() -> bool:
    """True if a ``wireguard`` link can be created (tried in a scratch namespace)."""
    ns = f"wbk{os.getpid() % 100_000}"
    if netns.run("ip", "netns", "add", ns, check=False).returncode != 0:
        return False
    try:
        res = netns.run("ip", "-n", ns, "link", "add", "wgprobe0", "type", "wireguard", check=False)
        return res.returncode == 0
    finally:
        netns.run("ip", "netns", "del", ns, check=False)


def tag() -> str:
    """Names of namespaces and interfaces carry this process's PID (unique on the machine)."""
    return f"{os.getpid() % 100_000}"


@contextlib.contextmanager
def built(root: Path, n: int, prefix: str) -> Iterator[Hosts]:
    """``n`` hosts on a bridge, torn down (processes killed by PID, namespaces deleted)."""
    hosts = Hosts(root, n, prefix=prefix)
    root.mkdir(parents=True, exist_ok=True)
    try:
        hosts.build()
        yield hosts
    finally:
        hosts.teardown()


def http_get(ns: str, path: str, timeout: float = 2.0) -> Any:
    """GET ``path`` from the agent in namespace ``ns`` (this thread enters it); None on error."""
    try:
        with (
            in_netns(ns),
            urllib.request.urlopen(f"http://{HTTP}{path}", timeout=timeout) as resp,
        ):
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Pinger:
    """Raw ICMP echo sockets opened inside each host's namespace, driven from one thread.

    Only this thread enters a namespace to open its sockets (``in_netns``); a socket
    stays in the namespace it was opened in. Replies are matched by identifier, payload
    and source address, so other ICMP traffic in the namespaces is ignored.
    """

    PAYLOAD = b"meshd-bench-ping"

    def __init__(self, namespaces: list[str]) -> None:
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.socks: dict[tuple[int, str], socket.socket] = {}
        try:
            for i, ns in enumerate(namespaces, 1):
                with in_netns(ns):
                    s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
                    self.socks[i, "ipv4"] = s4
                    s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                    self.socks[i, "ipv6"] = s6
            for s in self.socks.values():
                s.setblocking(False)
        except BaseException:
            self.close()
            raise
        self.by_fd = {s.fileno(): key for key, s in self.socks.items()}
        self.seq = 0

    def close(self) -> None:
        for s in self.socks.values():
            s.close()

    def send(self, src: int, family: str, dst: str) -> None:
        """One echo request from host ``src`` to ``dst``; no route yet is not an error."""
        self.seq = (self.seq + 1) & 0xFFFF
        kind = 8 if family == "ipv4" else 128
        header = struct.pack("!BBHHH", kind, 0, 0, self.ident, self.seq)
        packet = header + self.PAYLOAD
        if family == "ipv4":  # the kernel fills in the ICMPv6 checksum itself
            csum = _checksum(packet)
            packet = header[:2] + struct.pack("!H", csum) + header[4:] + self.PAYLOAD
        with contextlib.suppress(OSError):  # ENETUNREACH until the interface is up
            self.socks[src, family].sendto(packet, (dst, 0))

    def receive(self, timeout: float) -> list[tuple[int, str, str]]:
        """(host, family, source address) of each echo reply of ours within ``timeout``."""
        ready, _, _ = select.select(list(self.socks.values()), [], [], timeout)
        out = []
        for sock in ready:
            host, family = self.by_fd[sock.fileno()]
            while True:
                try:
                    data, addr = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                if family == "ipv4":
                    data = data[(data[0] & 0x0F) * 4 :] if data else b""
                want = 0 if family == "ipv4" else 129
                if len(data) < 8 or data[0] != want or data[8:] != self.PAYLOAD:
                    continue
                if struct.unpack("!H", data[4:6])[0] != self.ident:
                    continue
                out.append((host, family, ipaddress.ip_address(addr[0]).compressed))
        return out


class StatusPoller(threading.Thread):
    """Polls each host's ``/v1/status`` until it answers with addresses; notes when."""

    def __init__(self, hosts: Hosts, t0: float) -> None:
        super().__init__(daemon=True)
        self.hosts = hosts
        self.t0 = t0
        self.status: dict[int, dict[str, Any]] = {}
        self.ready_s: dict[int, float] = {}
        #: CPU seconds each agent had used when it first answered (start-up + join cost)
        self.ready_cpu_s: dict[int, float] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set() and len(self.ready_s) < self.hosts.n:
            for i, ns in enumerate(self.hosts.ns, 1):
                if i in self.ready_s or self.stopping.is_set():
                    continue
                st = http_get(ns, "/v1/status")
                if st and st.get("addresses", {}).get("ipv4"):
                    cpu = cpu_seconds(self.hosts.procs[i].pid)
                    with self.lock:
                        self.status[i] = st
                        self.ready_s[i] = time.monotonic() - self.t0
                        if cpu is not None:
                            self.ready_cpu_s[i] = cpu
                    pid = (st.get("wireguard") or {}).get("pid")
                    if pid:
                        self.hosts.wg_pids.add(int(pid))
            self.stopping.wait(0.2)

    def addresses(self) -> dict[int, dict[str, str]]:
        with self.lock:
            return {
                i: {f: ipaddress.ip_address(st["addresses"][f]).compressed for f in FAMILIES}
                for i, st in self.status.items()
            }


def run_args(settings: Settings) -> list[str]:
    return ["--wg-backend", settings.backend, "--profile", settings.profile, "--http", HTTP]


def start_mesh(hosts: Hosts, settings: Settings, t0: float) -> tuple[StatusPoller, float, float]:
    """init + run in host 1, then ``up`` in all the others at once; return the poller,
    when ``meshd init`` finished and when host 1's agent answered (s after ``t0``)."""
    args = run_args(settings)
    res = hosts.meshd(1, "init", *hosts.node_args(1))
    if res.returncode != 0:
        raise RuntimeError(f"meshd init failed: {res.stderr.strip()}")
    t_init = time.monotonic() - t0
    token = hosts.meshd(1, "token", "--data-dir", str(hosts.datadir(1)), "--uses", "100")
    if token.returncode != 0:
        raise RuntimeError(f"meshd token failed: {token.stderr.strip()}")
    poller = StatusPoller(hosts, t0)
    hosts.start(1, "run", "--data-dir", str(hosts.datadir(1)), *args)
    deadline = time.monotonic() + 60
    while http_get(hosts.ns[0], "/v1/status") is None:
        if hosts.procs[1].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"h1's agent did not start:\n{hosts.log(1)}")
        time.sleep(0.05)
    t_seed = time.monotonic() - t0
    seed = f"{hosts.underlay(1)}:{GOSSIP_PORT}"
    for i in range(2, hosts.n + 1):
        hosts.start(
            i, "up", *hosts.node_args(i), "--seed", seed, "--token", token.stdout.strip(), *args
        )
    poller.start()
    return poller, t_init, t_seed


def wait_all_pairs(
    hosts: Hosts, poller: StatusPoller, t0: float, within: float
) -> dict[tuple[int, int, str], float]:
    """Ping every (source, target, family) until each has answered once; return when
    (s after ``t0``) each first answered. Raises TimeoutError with what is missing."""
    n = hosts.n
    pending = {
        (i, j, f) for i in range(1, n + 1) for j in range(1, n + 1) if i != j for f in FAMILIES
    }
    first: dict[tuple[int, int, str], float] = {}
    last_sent: dict[tuple[int, int, str], float] = {}
    pinger = Pinger(hosts.ns)
    deadline = time.monotonic() + within
    try:
        while pending:
            now = time.monotonic()
            if now > deadline:
                dead = [i for i, p in hosts.procs.items() if p.poll() is not None]
                raise TimeoutError(
                    f"{len(pending)} of {len(pending) + len(first)} pairs never answered "
                    f"(e.g. {sorted(pending)[:4]}); agents exited: {dead}"
                )
            addrs = poller.addresses()
            owner = {a[f]: j for j, a in addrs.items() for f in FAMILIES}
            for key in pending:
                i, j, fam = key
                if j in addrs and now - last_sent.get(key, -1e9) >= PING_INTERVAL_S:
                    pinger.send(i, fam, addrs[j][fam])
                    last_sent[key] = now
            for host, fam, src in pinger.receive(0.05):
                target = owner.get(src)
                if target is not None and (host, target, fam) in pending:
                    pending.discard((host, target, fam))
                    first[host, target, fam] = time.monotonic() - t0
    finally:
        pinger.close()
    return first


def mesh_up(hosts: Hosts, settings: Settings, within: float) -> StatusPoller:
    """Start the agents and wait until every pair pings; the poller holds their status."""
    t0 = time.monotonic()
    poller, _, _ = start_mesh(hosts, settings, t0)
    try:
        wait_all_pairs(hosts, poller, t0, within)
    finally:
        poller.stopping.set()
        poller.join(5)
    return poller


def one_run(hosts: Hosts, settings: Settings) -> dict[str, Any]:
    """Bring the mesh up from nothing; return its timeline (s since ``meshd init``)."""
    t0 = time.monotonic()
    poller, t_init, t_seed = start_mesh(hosts, settings, t0)
    try:
        first = wait_all_pairs(hosts, poller, t0, RUN_TIMEOUT_S)
    finally:
        poller.stopping.set()
        poller.join(5)
    addrs = poller.addresses()
    # confirm with the real tool, both families, the last pair to answer
    i, j, _ = max(first, key=lambda k: first[k])
    confirmed = all(hosts.ping(i, addrs[j][f]) for f in FAMILIES)
    joined = max(poller.ready_s.values())
    pinging = max(first.values())
    backends = {st["wireguard"]["backend"] for st in poller.status.values()}
    return {
        "init_s": round(t_init, 3),
        "seed_ready_s": round(t_seed, 3),
        "all_joined_s": round(joined, 3),
        "all_pinging_s": round(pinging, 3),
        "pinging_after_joined_s": round(pinging - joined, 3),
        "per_family_s": {
            f: round(max(t for k, t in first.items() if k[2] == f), 3) for f in FAMILIES
        },
        "joined_s": [round(poller.ready_s[i], 3) for i in sorted(poller.ready_s)],
        "cpu_s_until_answering": [
            round(poller.ready_cpu_s[i], 2) for i in sorted(poller.ready_cpu_s)
        ],
        "pairs": len(first),
        # the five (source, target, family) to answer last, and when: a straggler shows here
        "last_pairs": [
            [i, j, fam, round(t, 3)]
            for (i, j, fam), t in sorted(first.items(), key=lambda kv: kv[1])[-5:]
        ],
        "confirmed_by_ping": confirmed,
        "backends": sorted(backends),
    }


def run(quick: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    """``settings.runs`` fresh meshes, one after the other; the timelines and their medians."""
    require_root()
    kernel = kernel_wireguard()
    settings = settings or Settings.for_mode(quick)
    runs: list[dict[str, Any]] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="meshd-bench-wg-") as tmp:
        for r in range(settings.runs):
            with built(Path(tmp) / f"run{r}", settings.nodes, f"wb{tag()}") as hosts:
                try:
                    runs.append(one_run(hosts, settings))
                except (TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
                    errors.append(f"run {r}: {type(exc).__name__}: {exc}")
    if not runs:
        raise RuntimeError("; ".join(errors) or "no run")
    keys = ("init_s", "seed_ready_s", "all_joined_s", "all_pinging_s", "pinging_after_joined_s")
    joiner_cpu = [c for r in runs for c in r["cpu_s_until_answering"][1:]]
    return {
        "benchmark": NAME,
        "mode": "quick" if quick else "full",
        "settings": asdict(settings),
        "kernel_wireguard_available": kernel,
        "summary": {k: summarise([r[k] for r in runs]) for k in keys},
        "joiner_cpu_s_until_answering": summarise(joiner_cpu),
        "runs": runs,
        "errors": errors,
    }


def format_summary(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [
        f"{s['nodes']} agents, each in its own network namespace, backend {s['backend']} "
        f"(kernel WireGuard available: {res['kernel_wireguard_available']}), "
        f"profile {s['profile']}; seconds after `meshd init` started",
        f"  {'milestone':<26} {'median':>7} {'min':>7} {'max':>7} {'n':>3}",
    ]
    names = {
        "init_s": "meshd init done",
        "seed_ready_s": "seed agent answers",
        "all_joined_s": "all joined (status)",
        "all_pinging_s": "every pair pings v4+v6",
        "pinging_after_joined_s": "  of which after joined",
    }
    for key, label in names.items():
        st = res["summary"][key]
        lines.append(
            f"  {label:<26} {st['median']:>7.2f} {st['min']:>7.2f} {st['max']:>7.2f} {st['n']:>3}"
        )
    cpu = res["joiner_cpu_s_until_answering"]
    if cpu["n"]:
        lines.append(
            f"  CPU time of one `meshd up` until it answered: median {cpu['median']:.2f} s "
            f"({cpu['min']:.2f} to {cpu['max']:.2f}, {cpu['n']} agents)"
        )
    if res["errors"]:
        lines.append(f"  failed runs: {'; '.join(res['errors'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_summary(run(quick=True)))
