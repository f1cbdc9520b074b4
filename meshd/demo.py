"""``meshd demo``: start a local N-node mesh and show it working.

As root, every node is a network namespace on a bridge (:class:`meshd.netns.Hosts`)
running ``meshd up`` with the real WireGuard data plane (``--wg-backend auto``: the
kernel module if present, else wireguard-go); the demo shows the peers table, pings
over the overlay (IPv4 and IPv6), a ``dig`` of a member name against meshd's DNS on
another host's overlay address, and how to reach each debug endpoint. Without root
(or with ``--loopback``) the agents run on 127.0.0.1 with the memory backend.

The first node initialises the cluster; node ``i`` joins through node ``i // 2``, so
joins through non-leader seeds are shown too. Every process is started here, tracked
by PID and stopped here, on Ctrl-C, SIGTERM or after ``--duration``; the namespace
teardown then checks that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000


#: How far below the kernel's ephemeral range :func:`free_port` draws its ports.
PORT_SPAN = 12_000


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's range for ports it picks itself (Linux default 32768-60999)."""
    try:
        low, high = (int(x) for x in Path(path).read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def _bindable(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(kind: int = socket.SOCK_DGRAM, *, also_tcp: bool = False) -> int:
    """A port free on 127.0.0.1 for ``kind`` (and for TCP as well with ``also_tcp``),
    drawn below the kernel's ephemeral range: a port the kernel picked for a bind to 0
    and we released can go to an outgoing connection before the process given it binds
    it (a Serf agent of benchmarks/vs_serf.py failed so: "address already in use")."""
    low, _ = ephemeral_range()
    first = max(1_024, low - PORT_SPAN)
    kinds = (kind, socket.SOCK_STREAM) if also_tcp else (kind,)
    for _ in range(200):
        port = random.randrange(first, low)
        if all(_bindable(port, k) for k in kinds):
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 between {first} and {low}")


def _setns(fd: int) -> None:
    """Move the calling thread (only) into the network namespace open at ``fd``."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body in the named network namespace (``ip netns add NAME``), or where we
    are for None. Only this thread moves, and it moves back; a socket opened inside
    stays in the namespace for its whole life."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


class LocalCluster:
    """N agents as child processes on 127.0.0.1, for the demo, tests and benchmarks.

    With ``netns`` every ``meshd`` command runs through ``ip netns exec NETNS`` (which
    execs, so PIDs stay the agents' own) and :meth:`get` talks to the namespace's
    loopback; the namespace itself is the caller's to create and delete."""

    def __init__(
        self, root: Path, *, log_dir: Path | None = None, netns: str | None = None
    ) -> None:
        self.root = root
        self.log_dir = log_dir or root
        self.netns = netns
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.udp: dict[str, int] = {}
        self.http: dict[str, int] = {}
        self._ports: set[tuple[int, int]] = set()
        self._ports_lock = threading.Lock()  # joins may run in threads

    def port(self, kind: int = socket.SOCK_DGRAM, *, also_tcp: bool = False) -> int:
        """A free port never handed out before by this cluster (free_port alone may return
        a port again before the agent given it has bound it)."""
        for _ in range(100):
            port = free_port(kind, also_tcp=also_tcp)
            keys = {(kind, port), (socket.SOCK_STREAM, port)} if also_tcp else {(kind, port)}
            with self._ports_lock:
                if not keys & self._ports:
                    self._ports |= keys
                    return port
        raise RuntimeError("no unused port found")

    def port_udp_tcp(self) -> int:
        """A port never handed out before that is free for TCP as well (DNS uses both)."""
        return self.port(also_tcp=True)

    def meshd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, sys.executable, "-m", "meshd", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def datadir(self, name: str) -> Path:
        return self.root / name

    def init(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        self.udp[name] = self.port()
        return self.meshd(
            "init", "--data-dir", str(self.datadir(name)), "--name", name,
            "--listen", f"127.0.0.1:{self.udp[name]}", *extra,
        )  # fmt: skip

    def token(self, via: str, *extra: str) -> str:
        res = self.meshd("token", "--data-dir", str(self.datadir(via)), *extra)
        if res.returncode != 0:
            raise RuntimeError(f"meshd token failed: {res.stderr.strip()}")
        return res.stdout.strip()

    def join(
        self, name: str, seed: str, token: str, *extra: str
    ) -> subprocess.CompletedProcess[str]:
        self.udp[name] = self.port()
        return self.meshd(
            "join", "--data-dir", str(self.datadir(name)), "--name", name,
            "--listen", f"127.0.0.1:{self.udp[name]}",
            "--seed", f"127.0.0.1:{self.udp[seed]}", "--token", token, "--timeout", "20s", *extra,
        )  # fmt: skip

    def start(self, name: str, *extra: str) -> None:
        """``meshd run`` for ``name``; ``extra`` are more run options (``--profile local``)."""
        self.http[name] = self.port(socket.SOCK_STREAM)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [
                *self.prefix, sys.executable, "-m", "meshd", "run",
                "--data-dir", str(self.datadir(name)),
                "--http", f"127.0.0.1:{self.http[name]}", "--wg-backend", "none", *extra,
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        log.close()
        self.wait_http(name)

    def wait_http(self, name: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"agent {name} exited with {proc.returncode}")
            with contextlib.suppress(OSError, ValueError):
                if self.get(name, "/healthz").get("status") == "ok":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"agent {name} did not answer on its HTTP port within {timeout}s")

    def get(self, name: str, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http[name]}{path}"
        with in_netns(self.netns), urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def wait_converged(self, names: list[str], timeout: float = 20.0) -> float:
        """Seconds until every named agent lists every named member as alive."""
        start = time.monotonic()
        want = set(names)
        while time.monotonic() - start < timeout:
            views = []
            for n in names:
                with contextlib.suppress(OSError, ValueError):
                    members = self.get(n, "/v1/members")["members"]
                    views.append({m["name"] for m in members if m["state"] == "alive"})
            if len(views) == len(names) and all(v >= want for v in views):
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"members did not converge within {timeout}s")


def say(text: str = "") -> None:
    """Print now: the demo's output is read live (a terminal, a pipe, a test)."""
    print(text, flush=True)


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM handled by ``handler`` for the body, restored after."""
    old_int = signal.signal(signal.SIGINT, handler)
    old_term = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _interruptible() -> contextlib.AbstractContextManager[None]:
    """Ctrl-C and SIGTERM both stop the demo (its teardown runs either way), even when
    started with SIGINT ignored (a background job of a non-interactive shell)."""
    return _signals(signal.default_int_handler)


def _no_interrupts() -> contextlib.AbstractContextManager[None]:
    """A second Ctrl-C must not cut the teardown short (and leave things behind)."""
    return _signals(signal.SIG_IGN)


def _hold(duration: float | None) -> None:
    """Until ``duration`` seconds pass, or Ctrl-C/SIGTERM (for None: only those)."""
    deadline = time.monotonic() + duration if duration is not None else None
    with contextlib.suppress(KeyboardInterrupt):
        # Printed inside: whoever reacts to it by interrupting gets a clean exit.
        say(
            "\nCtrl-C to stop." if duration is None else f"\nstopping in {duration:g} s (or Ctrl-C)"
        )
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)


def run_demo(nodes: int, duration: float | None, *, loopback: bool = False) -> None:
    """As root: agents in network namespaces with the real WireGuard data plane.
    Otherwise (or with ``loopback``): agents on 127.0.0.1 with the memory backend."""
    with _interruptible():
        if loopback or os.geteuid() != 0:
            why = "--loopback was given" if loopback else "not running as root"
            _loopback_demo(nodes, duration, why)
        else:
            _netns_demo(nodes, duration)


def _seed_of(i: int) -> int:
    """Host ``i`` (1-based, i > 1) joins through host ``i // 2``: the first two through
    the leader, the others through members that joined before them (non-leader seeds)."""
    return i // 2


# ------------------------------------------------------------------ loopback mode


def _loopback_demo(nodes: int, duration: float | None, why: str) -> None:
    from meshd.cli import _peers_table

    with tempfile.TemporaryDirectory(prefix="meshd-demo-") as tmp:
        cluster = LocalCluster(Path(tmp))
        names = [f"node{i}" for i in range(1, nodes + 1)]
        dns: dict[str, int] = {}
        try:
            say(f"meshd demo: {nodes} agents on 127.0.0.1, data in {tmp}")
            say(
                f"loopback mode ({why}): the WireGuard backend is `memory` (peers are "
                "computed, no interface is created, no packet crosses an overlay); "
                "as root the demo builds network namespaces with real WireGuard tunnels\n"
            )
            for i, name in enumerate(names, start=1):
                t0 = time.monotonic()
                if i == 1:
                    res = cluster.init(name)
                    what = f"$ meshd init --name {name}"
                else:
                    seed = names[_seed_of(i) - 1]
                    res = cluster.join(name, seed, cluster.token(names[0]))
                    what = f"$ meshd join --name {name} --seed {seed}"
                if res.returncode != 0:
                    raise RuntimeError(f"{name}: {res.stderr.strip()}")
                v4 = next(line.split()[1] for line in res.stdout.splitlines() if "ipv4" in line)
                say(f"{what}  -> {v4}  ({(time.monotonic() - t0) * 1000:.0f} ms)")
                dns[name] = cluster.port_udp_tcp()
                cluster.start(
                    name, "--wg-backend", "memory", "--dns", f"127.0.0.1:{dns[name]}",
                    "--dns-upstream", "off",
                )  # fmt: skip
            took = cluster.wait_converged(names, timeout=60)
            say(f"\nall {nodes} agents know all {nodes} members ({took:.2f} s)\n")
            say("(no tunnels, so no handshakes: the memory backend shows peers as unreachable)")
            say(f"$ meshd peers   (on {names[-1]})")
            say(_peers_table(cluster.get(names[-1], "/v1/members")["members"]))
            say("\nblock leases:")
            for lease in cluster.get(names[0], "/v1/leases")["leases"]:
                say(f"  block {lease['block']:<4} {lease['ipv4']:<18} {lease['holder_name']}")
            target = names[-1]
            port = dns[names[0]]
            _show_dig(port, "127.0.0.1", f"{target}.mesh.internal")
            say("\nno ping over the overlay in loopback mode: there is no WireGuard interface")
            url = f"http://127.0.0.1:{cluster.http[names[0]]}"
            say(f"\ndebug endpoint of {names[0]}: {url}/")
            say(f"  try: curl -s {url}/v1/status")
            _hold(duration)
        finally:
            with _no_interrupts():
                cluster.stop_all()
            say("demo stopped; all agents terminated")


def _show_dig(port: int, server: str, name: str, netns: str | None = None) -> None:
    """``dig`` A and AAAA of ``name`` at ``server``, shown as typed and answered."""
    if shutil.which("dig") is None:
        say("\n(dig not installed: apt-get install dnsutils)")
        return
    prefix = ["ip", "netns", "exec", netns] if netns else []
    for qtype in ("A", "AAAA"):
        argv = ["dig", f"@{server}", "-p", str(port), "+short", name, qtype]
        res = subprocess.run(
            [*prefix, *argv[:-2], "+time=2", "+tries=2", *argv[-2:]],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        say(f"\n$ {' '.join([*prefix, *argv])}")
        say(res.stdout.strip() or res.stderr.strip() or "(no answer)")


# ------------------------------------------------------------- namespace mode

#: Options of every agent in the namespace demo.
NETNS_RUN = ("--wg-backend", "auto", "--dns-upstream", "off")


def _netns_demo(nodes: int, duration: float | None) -> None:
    from meshd.netns import HTTP, Hosts, pid_alive, run, until

    missing = [t for t in ("ip", "ping") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} (apt-get install iproute2 iputils-ping)")
    tag = os.getpid() % 100_000
    with tempfile.TemporaryDirectory(prefix="meshd-demo-") as tmp:
        hosts = Hosts(Path(tmp), nodes, prefix=f"md{tag}-", ifprefix=f"mesh{tag}-")
        agents: list[int] = []
        try:
            say(f"meshd demo: {nodes} hosts as network namespaces {hosts.ns[0]} .. "
                f"{hosts.ns[-1]}, on a bridge (namespace {hosts.bridge_ns}), underlay "
                f"192.0.2.1-{nodes}/24; data in {tmp}")  # fmt: skip
            hosts.build()
            status: dict[int, dict[str, Any]] = {}

            def wait_up(i: int) -> dict[str, Any]:
                if i not in status:

                    def probe() -> Any:
                        proc = hosts.procs[i]
                        if proc.poll() is not None:
                            raise RuntimeError(
                                f"the agent of h{i} exited ({proc.returncode}):\n{hosts.log(i)}"
                                "(`meshd demo --loopback` runs without WireGuard)"
                            )
                        return hosts.get(i, "/v1/status")

                    status[i] = until(probe, 60, f"h{i}'s agent")
                    wg = status[i]["wireguard"]
                    if wg.get("pid"):
                        hosts.wg_pids.add(int(wg["pid"]))
                return status[i]

            t0 = time.monotonic()
            hosts.start(1, "up", *hosts.node_args(1), *NETNS_RUN, new_session=True)
            agents.append(1)
            st = wait_up(1)
            wg = st["wireguard"]
            say(f"\n$ ip netns exec {hosts.ns[0]} meshd up --name h1 ...   (init: leader)")
            say(f"  h1: {st['addresses']['ipv4']} {st['addresses']['ipv6']}  WireGuard "
                f"{wg['backend']} on {wg['interface']}")  # fmt: skip
            tok = hosts.meshd(1, "token", "--data-dir", str(hosts.datadir(1)),
                              "--uses", str(nodes), "--ttl", "1h")  # fmt: skip
            token = tok.stdout.strip()
            for i in range(2, nodes + 1):
                seed = _seed_of(i)
                wait_up(seed)  # the seed must run before anyone joins through it
                hosts.start(
                    i, "up", *hosts.node_args(i), "--seed", f"{hosts.underlay(seed)}:7946",
                    "--token", token, *NETNS_RUN, new_session=True,
                )  # fmt: skip
                agents.append(i)
            for i in range(2, nodes + 1):
                st = wait_up(i)
                say(f"  h{i}: joined through h{_seed_of(i)} -> {st['addresses']['ipv4']} "
                    f"{st['addresses']['ipv6']}")  # fmt: skip
            addrs = {i: status[i]["addresses"] for i in status}

            def converged() -> bool:
                for i in range(1, nodes + 1):
                    ms = hosts.get(i, "/v1/members")
                    if ms is None or sum(m["state"] == "alive" for m in ms["members"]) < nodes:
                        return False
                return True

            until(converged, 60, "every agent to see every member alive", step=0.3)
            say(f"\nall {nodes} agents up and know all {nodes} members "
                f"({time.monotonic() - t0:.1f} s after the first started)")  # fmt: skip

            a, b = 1, nodes
            for target in (addrs[b]["ipv4"], addrs[b]["ipv6"]):
                until(partial(hosts.ping, a, target), 60, f"h{a} -> h{b} at {target}")
                argv = ["ping", "-c", "3", "-i", "0.2", "-W", "2", target]
                res = run(*hosts.exec_args(a, *argv), check=False)
                say(f"\n$ ip netns exec {hosts.ns[a - 1]} {' '.join(argv)}   (h{a} -> h{b})")
                say("\n".join(ln for ln in res.stdout.splitlines() if ln.strip()))

            def tunnels_shown() -> bool:
                ms = hosts.get(nodes, "/v1/members")
                return ms is not None and all(
                    m["is_self"] or m["connection"] == "direct" for m in ms["members"]
                )

            with contextlib.suppress(TimeoutError):  # handshakes are read back every few s
                until(tunnels_shown, 20, "every tunnel of the last host shown", step=0.5)
            argv = ["meshd", "peers", "--data-dir", str(hosts.datadir(nodes))]
            res = hosts.meshd(nodes, *argv[1:])
            say(f"\n$ ip netns exec {hosts.ns[-1]} {' '.join(argv)}")
            say(res.stdout.rstrip() or res.stderr.strip())

            _show_dig(15353, addrs[1]["ipv4"], f"h{nodes}.mesh.internal", hosts.ns[1])

            say(f"\ndebug endpoints: http://{HTTP}/ inside each host's namespace, e.g.")
            say(f"  ip netns exec {hosts.ns[0]} curl -s http://{HTTP}/v1/status")
            say(f"  ip netns exec {hosts.ns[0]} {_meshd_command()} peers "
                f"--data-dir {hosts.datadir(1)}")  # fmt: skip
            say(f"  ip netns exec {hosts.ns[0]} dig @127.0.0.1 -p 15353 leader.mesh.internal")
            _hold(duration)
        finally:
            with _no_interrupts():
                say("\nstopping the agents (SIGTERM: each removes its interface) ...")
                clean = _stop_agents(hosts, agents)
                pids = [p.pid for p in hosts.procs.values()] + sorted(hosts.wg_pids)
                hosts.teardown()
                left = _leftovers(hosts, pids, pid_alive)
                say(f"{clean}/{len(agents)} agents stopped cleanly; "
                    + ("nothing left behind (namespaces, interfaces, sockets, processes)"
                       if not left else "LEFT BEHIND: " + ", ".join(left)))  # fmt: skip


def _meshd_command() -> str:
    """How to type ``meshd`` here: the script next to this Python (a venv's bin)."""
    script = shutil.which("meshd", path=os.path.dirname(sys.executable))
    return script or f"{sys.executable} -m meshd"


def _stop_agents(hosts: Any, agents: list[int]) -> int:
    """SIGTERM every agent, then wait: how many exited with status 0."""
    for i in agents:
        proc = hosts.procs[i]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    clean = 0
    for i in agents:
        with contextlib.suppress(subprocess.TimeoutExpired):
            clean += hosts.procs[i].wait(20) == 0
    return clean


def _leftovers(hosts: Any, pids: list[int], alive: Any) -> list[str]:
    """What of the demo still exists after the teardown (nothing, normally)."""
    from meshd.netns import run

    left = []
    listed = run("ip", "netns", "list", check=False).stdout.split()
    left += [f"namespace {ns}" for ns in [hosts.bridge_ns, *hosts.ns] if ns in listed]
    for i in range(1, hosts.n + 1):
        if os.path.exists(f"/var/run/wireguard/{hosts.ifname(i)}.sock"):
            left.append(f"socket /var/run/wireguard/{hosts.ifname(i)}.sock")
    left += [f"process {pid}" for pid in pids if alive(pid)]
    return left
