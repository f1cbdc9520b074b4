"""``meshd demo``: start a local N-node cluster on loopback and show it working.

The first node runs ``meshd init``; every other node joins through a different
existing member (so joins through non-leader seeds are shown too), each with its
own data directory in a temporary folder. Every process is started here, tracked
by PID and stopped here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def port(self, kind: int = socket.SOCK_DGRAM) -> int:
        """A free port never handed out before by this cluster (free_port alone may return
        a port again once it was released, before the agent given it has bound it)."""
        for _ in range(100):
            port = free_port(kind)
            with self._ports_lock:
                if (kind, port) not in self._ports:
                    self._ports.add((kind, port))
                    return port
        raise RuntimeError("no unused port found")

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


def run_demo(nodes: int, duration: float | None) -> None:
    from meshd.cli import _peers_table

    with tempfile.TemporaryDirectory(prefix="meshd-demo-") as tmp:
        cluster = LocalCluster(Path(tmp))
        names = [f"node{i + 1}" for i in range(nodes)]
        try:
            print(f"meshd demo: {nodes} agents on 127.0.0.1, data in {tmp}")
            print("(WireGuard data plane not started: the bootstrap/gossip layer only)\n")
            res = cluster.init(names[0])
            if res.returncode != 0:
                raise RuntimeError(res.stderr.strip())
            print(f"$ meshd init --name {names[0]}\n{res.stdout}")
            cluster.start(names[0])
            for i, name in enumerate(names[1:], start=1):
                seed = names[(i - 1) // 2]  # joins go through leader and non-leader seeds
                token = cluster.token(names[0])
                t0 = time.monotonic()
                res = cluster.join(name, seed, token)
                if res.returncode != 0:
                    raise RuntimeError(f"{name}: {res.stderr.strip()}")
                ms = (time.monotonic() - t0) * 1000
                v4 = next(line.split()[1] for line in res.stdout.splitlines() if "ipv4" in line)
                print(f"$ meshd join --name {name} --seed {seed}  -> {v4}  ({ms:.0f} ms)")
                cluster.start(name)
            took = cluster.wait_converged(names)
            print(f"\nall {nodes} agents know all {nodes} members ({took:.2f} s)\n")
            print(f"members as seen by {names[-1]}:")
            print(_peers_table(cluster.get(names[-1], "/v1/members")["members"]))
            print("\nblock leases:")
            for lease in cluster.get(names[0], "/v1/leases")["leases"]:
                print(f"  block {lease['block']:<4} {lease['ipv4']:<18} {lease['holder_name']}")
            print(f"\ndebug endpoint of {names[0]}: http://127.0.0.1:{cluster.http[names[0]]}/")
            print(f"  try: curl -s http://127.0.0.1:{cluster.http[names[0]]}/v1/status")
            if duration is None:
                print("\nCtrl-C to stop.")
            deadline = time.monotonic() + duration if duration is not None else None
            with contextlib.suppress(KeyboardInterrupt):
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.2)
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                cluster.stop_all()
                signal.signal(signal.SIGINT, signal.default_int_handler)
            print("demo stopped; all agents terminated")


if __name__ == "__main__":
    run_demo(int(os.environ.get("NODES", "3")), None)
