"""Hosts as Linux network namespaces on one bridge, one ``meshd`` agent per host.

Used by ``meshd demo`` (as root), the end-to-end tests and the WireGuard benchmarks, so
that all three build and tear down the same topology. Needs root, iproute2 and, for the
userspace backend, wireguard-go.

Topology: a namespace ``<prefix>br`` holding bridge ``br0``; host ``i`` (1-based) is the
namespace ``<prefix>h<i>`` whose ``eth0`` (a veth into the bridge) has the underlay
address ``192.0.2.<i>/24`` (TEST-NET-1, RFC 5737: never routed outside these namespaces).
The WireGuard interface of host ``i`` is ``<ifprefix>h<i>``: interface names must be unique
across namespaces because wireguard-go's UAPI socket directory ``/var/run/wireguard`` is
shared by all of them (see TEST-HOSTS.md).

Every process is tracked by PID and killed by PID in :meth:`Hosts.teardown`, which also
kills whatever is still inside the namespaces (``ip netns pids``) and deletes them.
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
from typing import IO, Any

#: The debug endpoint every agent in a namespace listens on (each namespace has its own
#: loopback, so all hosts can use the same address).
HTTP = "127.0.0.1:7947"
GOSSIP_PORT = 7946


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output (text); raise on failure when ``check``."""
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def until(probe: Callable[[], Any], within: float, what: str, step: float = 0.2) -> Any:
    """Poll ``probe`` until it returns something true (returned) or ``within`` s pass."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(step)
    raise TimeoutError(f"timed out after {within:g} s waiting for {what} (last: {last!r})")


class Hosts:
    """``n`` namespaces on a bridge (itself in a namespace), one agent per namespace."""

    def __init__(self, root: Path, n: int, prefix: str, ifprefix: str | None = None) -> None:
        if len(f"{prefix}br") > 15 or len(f"{ifprefix or prefix}h{n}") > 15:
            raise ValueError(f"prefix {prefix!r} too long for interface names (15 chars)")
        self.root = root
        self.n = n
        self.prefix = prefix
        self.ifprefix = ifprefix or prefix
        self.bridge_ns = f"{prefix}br"
        self.ns = [f"{prefix}h{i}" for i in range(1, n + 1)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        #: wireguard-go PIDs reported by the agents (children that outlive a SIGKILLed
        #: agent); killed at teardown.
        self.wg_pids: set[int] = set()
        self.logs: dict[int, IO[bytes]] = {}
        self._built: list[str] = []

    # -- topology ---------------------------------------------------------------------

    def build(self) -> None:
        """Create the bridge namespace and the hosts (idempotent only via teardown)."""
        run("ip", "netns", "add", self.bridge_ns)
        self._built.append(self.bridge_ns)
        run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ns, 1):
            run("ip", "netns", "add", ns)
            self._built.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run(
                "ip", "link", "add", "eth0", "netns", ns,
                "type", "veth", "peer", "name", f"p{i}", "netns", self.bridge_ns,
            )  # fmt: skip
            run("ip", "-n", self.bridge_ns, "link", "set", f"p{i}", "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{self.underlay(i)}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")

    def teardown(self) -> None:
        """Kill every process we started or that runs in our namespaces; delete them."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        for log in self.logs.values():
            log.close()
        for ns in self._built:
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for wg_pid in self.wg_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(wg_pid, signal.SIGKILL)
        for ns in self._built:
            run("ip", "netns", "del", ns, check=False)
        self._built.clear()
        for i in range(1, self.n + 1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/var/run/wireguard/{self.ifname(i)}.sock")

    @staticmethod
    def underlay(i: int) -> str:
        return f"192.0.2.{i}"

    def ifname(self, i: int) -> str:
        return f"{self.ifprefix}h{i}"

    def datadir(self, i: int) -> Path:
        return self.root / f"h{i}"

    # -- agents -----------------------------------------------------------------------

    def exec_args(self, i: int, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i - 1], *cmd]

    def meshd(self, i: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a ``meshd`` subcommand to completion in host ``i``."""
        return run(*self.exec_args(i, sys.executable, "-m", "meshd", *args), timeout=timeout)

    def start(self, i: int, *args: str, new_session: bool = False) -> subprocess.Popen[bytes]:
        """Start a long-running ``meshd`` subcommand in host ``i``; output to its log.
        ``new_session``: out of the terminal's process group, so a Ctrl-C reaches only
        the caller, which then stops the agents in order."""
        self.logs[i] = open(self.root / f"h{i}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            self.exec_args(i, sys.executable, "-m", "meshd", *args),
            stdout=self.logs[i],
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        self.procs[i] = proc
        return proc

    def node_args(self, i: int) -> list[str]:
        """``--data-dir --name --listen --advertise --interface`` for host ``i``."""
        addr = f"{self.underlay(i)}:{GOSSIP_PORT}"
        return [
            "--data-dir", str(self.datadir(i)), "--name", f"h{i}",
            "--listen", addr, "--advertise", addr, "--interface", self.ifname(i),
        ]  # fmt: skip

    def get(self, i: int, path: str, http: str = HTTP) -> Any:
        """GET ``path`` from host ``i``'s debug endpoint; parsed JSON or None."""
        code = (
            "import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
        )
        res = run(
            *self.exec_args(i, sys.executable, "-c", code, f"http://{http}{path}"), check=False
        )
        return json.loads(res.stdout) if res.returncode == 0 else None

    def post(self, i: int, path: str, body: dict[str, Any], http: str = HTTP) -> Any:
        """POST ``body`` (JSON) to host ``i``'s debug endpoint with the agent's bearer
        token (read from its data directory); parsed JSON or None."""
        from meshd.state import DataDir

        token = DataDir(self.datadir(i)).read_key("http").hex()
        code = (  # the token goes through stdin, not the command line
            "import sys, urllib.request; "
            "req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), "
            "method='POST', headers={'Authorization': 'Bearer ' + sys.stdin.read().strip(), "
            "'Content-Type': 'application/json'}); "
            "sys.stdout.write(urllib.request.urlopen(req, timeout=10).read().decode())"
        )
        argv = self.exec_args(
            i, sys.executable, "-c", code, f"http://{http}{path}", json.dumps(body)
        )
        res = subprocess.run(
            argv, input=token, capture_output=True, text=True, timeout=30, check=False
        )
        return json.loads(res.stdout) if res.returncode == 0 else None

    def ping(self, i: int, addr: str) -> bool:
        """One ping from host ``i`` to ``addr`` with a 1 s deadline."""
        res = run(*self.exec_args(i, "ping", "-c", "1", "-W", "1", addr), check=False)
        return res.returncode == 0

    def log(self, i: int) -> str:
        return (self.root / f"h{i}.log").read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def built(
    root: Path, n: int, prefix: str, ifprefix: str | None = None, tools: tuple[str, ...] = ()
) -> Iterator[Hosts]:
    """:class:`Hosts` built, torn down on the way out whatever happens; first checks that
    ``tools`` (with ``ip``) are on PATH, naming the missing ones."""
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} on PATH (see `make deps`)")
    hosts = Hosts(root, n, prefix, ifprefix)
    try:
        hosts.build()
        yield hosts
    finally:
        hosts.teardown()
