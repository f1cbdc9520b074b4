"""meshd next to HashiCorp Serf: N agents of each on 127.0.0.1, same machine, same run.

Both systems run memberlist's LAN timers (Serf ``-profile=lan``, meshd ``--profile
lan``: probe every 1 s, probe timeout 0.5 s, gossip every 0.2 s to 3 members,
suspicion multiplier 4, Lifeguard). For each cluster size and each repetition a
fresh cluster of each system is started, measured and stopped; the two systems
never run at the same time, and their order alternates between repetitions.

What is measured, per cluster:

1. **convergence**: from the moment the last agent is up and joined (its member
   counts answer and include another member: Serf after its ``-join`` push-pull,
   meshd once ``meshd run`` serves a node that ``meshd join`` admitted) until
   every agent counts N members, all alive (Serf RPC ``stats``: members - failed
   - left; meshd ``GET /v1/status``: ``members.alive`` and ``member_count``).
   ``launch_to_converged_s`` counts from the start of the last agent instead (Serf:
   the spawn of ``serf agent -join``; meshd: the spawn of ``meshd up``, which joins
   and then runs in one process, when agents start a few at a time, the spawn of the
   last ``meshd run`` when all start at once). It includes start-up: Python imports
   for meshd, which dominate on a small machine.

   **Start-up.** By default at most ``--start-concurrency`` (the CPU count) agents
   start at once, each counted as starting until it answers with another member:
   one agent per host is what a deployment looks like, and 100 Python agents
   importing at once on 2 CPUs (about 0.3 s of CPU each) starve each other for tens
   of seconds, which turns start-up into a measure of CPU starvation (probes time out
   against agents that have no CPU). ``--start-concurrency 0`` spawns every agent at
   once (meshd: ``meshd join`` for all, 4 at a time, then every ``meshd run``), as
   earlier versions did. A meshd agent is admitted during its join (the leader leases
   its block and gossips its record) before it serves HTTP, so when agents start one
   by one the others often list it, alive, by the time it answers: its convergence
   after it is up is then 0.
2. **dissemination**, twice:
   *agent-stamped*: Serf: a user event (RPC ``event``, no coalescing) sent to one
   agent, until every agent's event handler has run; the handler stamps the time
   (``date +%s%N``), so this includes a fork and exec of ``sh`` and ``date`` (a few
   ms). meshd: ``POST /v1/record {"hostname": NEW}`` on one agent, until every
   other agent has logged ``member updated`` for it (structlog ISO time stamps,
   microseconds). Neither has poll granularity.
   *polled*, the same method for both: Serf: a tag change (RPC ``tags``: a new
   alive message with a higher incarnation, the closer analogue of a meshd record
   change) until every agent's ``members-filtered`` shows it; meshd: the same
   ``POST /v1/record`` until every agent's ``/v1/members`` shows NEW.
3. **failure detection**: SIGKILL one agent; time until every other agent counts
   one failed (Serf ``stats``) / dead (meshd ``/v1/status``) member, the same
   cheap query as for convergence (nothing else was killed; one member query per
   agent afterwards checks that it is the victim: ``failure_victim_dead_in``). The
   first and the last observer are kept; for meshd also from the ``member dead``
   log stamps (``failure_stamped``; Serf's log stamps have whole seconds only).
4. **idle cost**: CPU seconds (utime + stime from ``/proc/PID/stat``) of each agent
   over an idle window with nothing polling the agents, and ``VmRSS`` at its end.
5. **false suspicions** of members that were never killed, from the agents' logs
   split by phase (start-up, convergence, idle, dissemination, failure): refuted
   suspicions (Serf "Refuting a suspect/dead message", meshd "refuted a suspicion
   of this node"; logged once by the suspected agent in both, so comparable),
   failure declarations (Serf "EventMemberFailed: X", meshd "member dead"; logged
   by every agent that declares it), and suspicion lines (Serf "Suspect X has
   failed, no acks received", by the prober only; meshd "member suspect", by every
   agent: not comparable). Also from polling: agents whose counts show suspect or
   dead members beyond the killed one (Serf's counts show failed members only:
   memberlist keeps suspicions to itself). Start-up is reported apart: a meshd
   agent knows members from its join grant before their processes run.

Polling: every agent still waiting for a condition is asked concurrently (HTTP/1.1
with kept-alive connections for meshd, ``benchmarks/httpclient.py``; one persistent
msgpack RPC connection per agent for Serf); the next round starts ``poll_interval``
(50 ms) after the previous one started, but no sooner than ``pending / poll_rate``
(400 requests/s for all agents together), or at once if the round itself took longer.
The cap matters: answering ``/v1/status`` costs a meshd agent about 0.4 ms of CPU (a Serf agent
0.08 ms for ``stats``), so 100 agents asked every 50 ms would take most of a core
of a small machine from the agents being measured. A polled figure is late by up
to one round period (``poll_*.period_ms``): at N=100, 250 ms while every agent is
still waiting, 50 ms once fewer than 20 are. An agent drops out of the rounds once
it meets the condition. meshd has no filtered member query, so the polled
dissemination fetches its whole member list (Serf's ``members-filtered`` returns
one member), which costs meshd more per poll and shows in its period. The
agent-stamped figures are taken with nothing polling the agents. Every loop is
bounded in rounds and in time.

Processes: every agent is a child started here in its own session (Ctrl-C reaches
only this process) with a parent-death signal, tracked by PID and stopped here
(SIGTERM, then SIGKILL) on every exit path, including exceptions, Ctrl-C and
SIGTERM. Data directories and logs live in a temporary directory removed at the
end (``--keep-logs DIR`` copies the agents' logs first).

Run: ``python -m benchmarks.vs_serf --nodes 30,100 --runs 3`` (about 20 minutes on
2 CPUs; ``--meshd-commit HEAD`` runs meshd from a ``git archive`` of that commit, not
from the checkout, which other work may be editing during the run), or ``python -m
benchmarks.run --only vs_serf`` (never part of the default ``make bench``). Needs
the ``serf`` binary (Debian package ``serf``, ``make bench-deps``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack

from benchmarks.common import (
    RESULTS_DIR,
    load_average,
    machine_info,
    summarise,
    timestamp,
    write_json,
)
from benchmarks.httpclient import KeepAliveClient
from benchmarks.join_rtt import bytecode_cache
from meshd.demo import free_port

NAME: Final = "vs_serf"
LOOPBACK: Final = "127.0.0.1"
SYSTEMS: Final = ("serf", "meshd")
#: One request to one agent (HTTP or RPC) gives up after this long.
REQUEST_TIMEOUT_S: Final = 5.0
#: The Serf user event and the tag used for dissemination.
SERF_EVENT: Final = "bench"
SERF_TAG: Final = "v"


@dataclass(frozen=True)
class Settings:
    """Cluster sizes, repetitions, the idle window and every time limit."""

    nodes: tuple[int, ...] = (30, 100)
    runs: int = 3
    idle_s: float = 30.0
    poll_interval_s: float = 0.05
    #: Requests per second, all agents together, at most: a round over P pending agents
    #: starts max(poll_interval_s, P / poll_rate) after the previous one. Answering a
    #: poll costs a Python agent 0.4 ms of CPU (/v1/status; 1.2 ms for /v1/members of
    #: 20 members), so 100 agents polled every 50 ms would cost the machine a core.
    poll_rate: float = 400.0
    systems: tuple[str, ...] = SYSTEMS
    settle_s: float = 3.0  # after convergence, before the idle window
    start_timeout_s: float = 240.0  # all agents up and converged
    update_timeout_s: float = 60.0
    failure_timeout_s: float = 120.0
    join_concurrency: int = 4  # concurrent `meshd join` commands (all-at-once start only)
    #: Agents starting at once: an agent counts as starting from its spawn (meshd: from
    #: its `meshd join`) until it answers with another member in its counts. The default,
    #: the machine's CPU count, keeps one host's start-up from being slowed by dozens of
    #: other agents starting on the same CPUs (one agent per host is what a deployment
    #: looks like); 0 spawns every agent at once (meshd: after all the joins).
    start_concurrency: int = field(default_factory=lambda: os.cpu_count() or 2)
    #: Run the meshd agents from this commit (a `git archive` export in the temporary
    #: directory) instead of the checkout, whose files may change during a long run.
    meshd_commit: str | None = None

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(nodes=(30,), runs=1, idle_s=15.0)
        return cls()


# ------------------------------------------------------------------------ processes

_PR_SET_PDEATHSIG: Final = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if this benchmark dies (a safety net only)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Every long-running child started by the benchmark, by PID; ``stop_all`` ends them."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C in the terminal reaches only the benchmark
                preexec_fn=_die_with_parent,  # spawned from the main thread only
            )
        self.procs[proc.pid] = proc
        return proc

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Signal one child (Popen refuses to signal a PID it has already reaped)."""
        proc = self.procs[pid]
        if proc.poll() is None:
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def alive(self, pid: int) -> bool:
        proc = self.procs.get(pid)
        return proc is not None and proc.poll() is None

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every live child, wait (bounded), then SIGKILL whatever is left."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in live:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.procs.clear()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so every ``finally`` (process clean-up) runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        before = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class PortPool:
    """Free loopback ports (:func:`meshd.demo.free_port`: below the kernel's ephemeral
    range), never the same one twice in a run."""

    def __init__(self) -> None:
        self.used: set[int] = set()

    def take(self, tcp: bool = False, udp: bool = False) -> int:
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        for _ in range(1_000):
            port = free_port(kind, also_tcp=tcp and udp)
            if port not in self.used:
                self.used.add(port)
                return port
        raise RuntimeError("no free loopback port found in 1000 tries")


# ----------------------------------------------------------------------------- /proc

_TICKS: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, from /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# -------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class Member:
    """One member as one agent reports it, normalised across the two systems."""

    name: str
    state: str  # alive, suspect, dead (Serf: failed), left, leaving, unknown
    label: str | None  # meshd: the record's hostname; Serf: the tag SERF_TAG


@dataclass(frozen=True)
class Counts:
    """An agent's member counts (a cheap query in both systems: no member list)."""

    total: int
    alive: int
    suspect: int | None  # None for Serf: memberlist keeps suspicions to itself
    dead: int  # meshd dead, Serf failed
    health: int | None  # Lifeguard awareness: Serf health_score, meshd local_health


@dataclass(frozen=True)
class LogEvent:
    """A line of an agent's log that the measurements use."""

    kind: str  # suspected, declared_failed, refuted, updated
    subject: str  # the member concerned (for "refuted": the agent itself)
    wall: float | None  # seconds since the epoch; None where the log has only seconds
    seq: int | None = None  # meshd "member updated": the record's sequence number


class SerfRPC:
    """A minimal client of Serf's msgpack RPC: one connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seq = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        self.lock = asyncio.Lock()

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(LOOPBACK, self.port)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        await self._call("handshake", {"Version": 1})

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def _next(self) -> Any:
        assert self.reader is not None
        for _ in range(10_000):  # bounded: a reply is far smaller than 10,000 reads
            with contextlib.suppress(StopIteration):
                return next(self.unpacker)
            data = await self.reader.read(1 << 16)
            if not data:
                raise ConnectionError("serf closed the RPC connection")
            self.unpacker.feed(data)
        raise ConnectionError("serf RPC reply did not arrive in 10000 reads")

    async def _call(self, command: str, body: Any = None, reply_body: bool = False) -> Any:
        assert self.writer is not None
        seq, self.seq = self.seq, self.seq + 1
        out = msgpack.packb({"Command": command, "Seq": seq})
        if body is not None:
            out += msgpack.packb(body, use_bin_type=True)
        self.writer.write(out)
        await self.writer.drain()
        header = await self._next()
        if header.get("Seq") != seq:
            raise ConnectionError(f"serf RPC out of step: seq {header.get('Seq')} for {seq}")
        if header.get("Error"):
            raise RuntimeError(f"serf RPC {command}: {header['Error']}")
        return await self._next() if reply_body else None

    async def call(self, command: str, body: Any = None, reply_body: bool = False) -> Any:
        """One request; a broken connection is dropped and re-made on the next call."""
        async with self.lock:
            try:
                if self.writer is None:
                    await self._connect()
                return await self._call(command, body, reply_body)
            except BaseException:
                await self.close()
                raise


class Cluster:
    """N agents of one system: what the measurements need from either."""

    system: str = ""
    prefix: str = ""

    def __init__(
        self, root: Path, n: int, procs: Processes, ports: PortPool, start_concurrency: int = 0
    ) -> None:
        self.root = root
        self.n = n
        self.start_concurrency = start_concurrency
        self.procs = procs
        self.ports = ports
        self.names = [f"{self.prefix}{i}" for i in range(n)]
        self.pids: dict[str, int] = {}
        self.logs: dict[str, Path] = {name: root / f"{name}.log" for name in self.names}

    async def launch(self) -> float:
        """Start all agents; return the monotonic time right after the last spawn."""
        raise NotImplementedError

    async def start_staggered(
        self, names: Sequence[str], start: Callable[[str], Awaitable[None]], concurrency: int
    ) -> float:
        """Start ``names`` with at most ``concurrency`` of them starting at once: each
        ``start(name)`` (which spawns it: ``serf agent -join``, ``meshd up``) then waits
        until it answers with another member in its counts. The monotonic time of the
        last spawn."""
        sem = asyncio.Semaphore(concurrency)
        last = time.monotonic()

        async def one(name: str) -> None:
            nonlocal last
            async with sem:
                last = max(last, time.monotonic())
                await start(name)
                await wait_until(lambda: self.joined(name), 60.0, f"{self.system} agent {name}")

        await asyncio.gather(*(one(name) for name in names))
        return last

    async def joined(self, name: str) -> bool:
        """The agent answers and counts another member."""
        counts = await self.counts_if_answering(name)
        return counts is not None and counts.total >= 2

    async def counts(self, name: str) -> Counts:
        """The named agent's member counts (raises if it does not answer)."""
        raise NotImplementedError

    async def member(self, name: str, target: str) -> Member | None:
        """How the named agent sees ``target`` (None: not in its list)."""
        raise NotImplementedError

    async def update(self, name: str, label: str) -> int:
        """Change the named agent's label (meshd: record hostname, returns the record's
        new sequence number; Serf: a tag, returns 0)."""
        raise NotImplementedError

    def log_events(self, owner: str, text: str) -> list[LogEvent]:
        """The suspicion, failure, refutation and update lines of ``owner``'s log."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release client resources (the processes are stopped by ``Processes``)."""

    async def counts_if_answering(self, name: str) -> Counts | None:
        """The agent's counts, None while it does not answer; RuntimeError if it exited."""
        if not self.procs.alive(self.pids[name]):
            raise RuntimeError(f"{self.system} agent {name} exited; see {self.logs[name]}")
        try:
            return await asyncio.wait_for(self.counts(name), REQUEST_TIMEOUT_S)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            return None

    async def answers(self, name: str) -> bool:
        return await self.counts_if_answering(name) is not None

    def log_offsets(self) -> dict[str, int]:
        out = {}
        for name, path in self.logs.items():
            try:
                out[name] = path.stat().st_size
            except OSError:
                out[name] = 0
        return out


class SerfCluster(Cluster):
    system = "serf"
    prefix = "s"

    def __init__(
        self, root: Path, n: int, procs: Processes, ports: PortPool, start_concurrency: int = 0
    ) -> None:
        super().__init__(root, n, procs, ports, start_concurrency)
        self.serf = shutil.which("serf") or "/usr/bin/serf"
        self.bind = {name: ports.take(tcp=True, udp=True) for name in self.names}
        self.rpc_port = {name: ports.take(tcp=True) for name in self.names}
        self.rpc = {name: SerfRPC(self.rpc_port[name]) for name in self.names}
        self.events_dir = root / "events"
        self.events_dir.mkdir()
        self.handler = root / "handler.sh"
        # The time is taken first, before the payload is read from stdin.
        self.handler.write_text('#!/bin/sh\nt=$(date +%s%N)\nread -r p\necho "$t $p" >> "$1"\n')
        self.handler.chmod(0o755)

    def _argv(self, name: str, join: str | None) -> list[str]:
        argv = [
            self.serf, "agent", f"-node={name}", "-profile=lan", "-log-level=info",
            f"-bind={LOOPBACK}:{self.bind[name]}", f"-rpc-addr={LOOPBACK}:{self.rpc_port[name]}",
            f"-event-handler=user:{SERF_EVENT}={self.handler} {self.events_dir / name}",
        ]  # fmt: skip
        if join:
            argv.append(f"-join={join}")
        return argv

    async def launch(self) -> float:
        seed = self.names[0]
        self.pids[seed] = self.procs.spawn(self._argv(seed, None), self.logs[seed]).pid
        await wait_until(lambda: self.answers(seed), 20.0, f"serf agent {seed} RPC")
        join = f"{LOOPBACK}:{self.bind[seed]}"

        async def start(name: str) -> None:
            self.pids[name] = self.procs.spawn(self._argv(name, join), self.logs[name]).pid

        if self.start_concurrency > 0:
            return await self.start_staggered(self.names[1:], start, self.start_concurrency)
        for name in self.names[1:]:
            await start(name)
        return time.monotonic()

    async def counts(self, name: str) -> Counts:
        body = await self.rpc[name].call("stats", reply_body=True)
        st = body["serf"]
        total, failed, left = int(st["members"]), int(st["failed"]), int(st["left"])
        return Counts(total, total - failed - left, None, failed, int(st["health_score"]))

    async def member(self, name: str, target: str) -> Member | None:
        query = {"Tags": {}, "Status": "", "Name": f"^{re.escape(target)}$"}
        body = await self.rpc[name].call("members-filtered", query, reply_body=True)
        for m in body["Members"]:
            if m["Name"] == target:
                state = {"failed": "dead"}.get(m["Status"], m["Status"])
                return Member(target, state, (m.get("Tags") or {}).get(SERF_TAG))
        return None

    async def update(self, name: str, label: str) -> int:
        await self.rpc[name].call("tags", {"Tags": {SERF_TAG: label}, "DeleteTags": []})
        return 0

    async def user_event(self, name: str, payload: str) -> None:
        body = {"Name": SERF_EVENT, "Payload": payload.encode(), "Coalesce": False}
        await self.rpc[name].call("event", body)

    def event_times(self, payload: str) -> dict[str, int]:
        """Wall-clock ns at which each agent's handler ran for ``payload``."""
        out = {}
        for name in self.names:
            with contextlib.suppress(OSError):
                for line in (self.events_dir / name).read_text().splitlines():
                    stamp, _, got = line.partition(" ")
                    if got == payload and stamp.isdigit():
                        out[name] = int(stamp)
                        break
        return out

    _LOG_PATTERNS: Final = (
        ("suspected", re.compile(r"memberlist: Suspect (\S+) has failed, no acks received")),
        ("declared_failed", re.compile(r"serf: EventMemberFailed: (\S+) ")),
        ("refuted", re.compile(r"memberlist: Refuting a (?:suspect|dead) message")),
    )

    def log_events(self, owner: str, text: str) -> list[LogEvent]:
        out = []
        for line in text.splitlines():
            for kind, pattern in self._LOG_PATTERNS:
                if m := pattern.search(line):
                    out.append(LogEvent(kind, m.group(1) if m.groups() else owner, None))
        return out

    async def close(self) -> None:
        for rpc in self.rpc.values():
            await rpc.close()


class MeshdCluster(Cluster):
    system = "meshd"
    prefix = "n"

    def __init__(
        self,
        root: Path,
        n: int,
        procs: Processes,
        ports: PortPool,
        join_concurrency: int,
        src: Path | None = None,
        start_concurrency: int = 0,
    ) -> None:
        super().__init__(root, n, procs, ports, start_concurrency)
        self.join_concurrency = join_concurrency
        # `python -m meshd` runs in ``root`` (not in the checkout, which would come first
        # on sys.path), from ``src`` when given.
        self.env = meshd_env(src)
        self.udp = {name: ports.take(udp=True) for name in self.names}
        self.http = {name: ports.take(tcp=True) for name in self.names}
        self.session: KeepAliveClient | None = None
        self.join_ms: list[float] = []

    def datadir(self, name: str) -> Path:
        return self.root / name

    def _client(self) -> KeepAliveClient:
        if self.session is None:  # kept-alive, one connection per agent
            self.session = KeepAliveClient(timeout=REQUEST_TIMEOUT_S)
        return self.session

    async def _get(self, name: str, path: str) -> Any:
        return await self._client().get_json(LOOPBACK, self.http[name], path)

    async def _meshd(self, *args: str, limit_s: float = 60.0) -> str:
        """Run a short ``meshd`` command; its stdout, or RuntimeError with its stderr."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshd", *args,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, cwd=self.root,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), limit_s)
        finally:
            if proc.returncode is None:  # timed out or cancelled: it is ours to end
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode != 0:
            raise RuntimeError(f"meshd {args[0]} failed: {err.decode().strip()}")
        return out.decode()

    def _spawn_run(self, name: str, *up: str) -> None:
        """Spawn ``meshd run``, or ``meshd up`` (join, then run, one process) when ``up``
        holds the join arguments."""
        argv = [
            sys.executable, "-m", "meshd", "up" if up else "run",
            "--data-dir", str(self.datadir(name)), *up,
            "--http", f"{LOOPBACK}:{self.http[name]}", "--wg-backend", "none",
            "--profile", "lan", "--log-format", "json",
        ]  # fmt: skip
        self.pids[name] = self.procs.spawn(argv, self.logs[name], self.env, self.root).pid

    async def launch(self) -> float:
        seed = self.names[0]
        await self._meshd(
            "init", "--data-dir", str(self.datadir(seed)), "--name", seed,
            "--listen", f"{LOOPBACK}:{self.udp[seed]}",
        )  # fmt: skip
        self._spawn_run(seed)
        await wait_until(lambda: self.answers(seed), 30.0, f"meshd agent {seed} HTTP")
        token = await self._meshd(
            "token", "--data-dir", str(self.datadir(seed)), "--uses", "0", "--ttl", "2h"
        )
        sem = asyncio.Semaphore(self.join_concurrency)

        def join_args(name: str) -> list[str]:
            return [
                "--name", name, "--listen", f"{LOOPBACK}:{self.udp[name]}",
                "--seed", f"{LOOPBACK}:{self.udp[seed]}", "--token", token.strip(),
                "--timeout", "30s",
            ]  # fmt: skip

        async def join(name: str) -> None:
            t0 = time.perf_counter()
            await self._meshd("join", "--data-dir", str(self.datadir(name)), *join_args(name))
            self.join_ms.append((time.perf_counter() - t0) * 1000)

        if self.start_concurrency > 0:  # host by host, as a user does: `meshd up`

            async def start(name: str) -> None:
                self._spawn_run(name, *join_args(name))

            return await self.start_staggered(self.names[1:], start, self.start_concurrency)

        async def join_limited(name: str) -> None:
            async with sem:
                await join(name)

        await asyncio.gather(*(join_limited(name) for name in self.names[1:]))
        for name in self.names[1:]:
            self._spawn_run(name)
        return time.monotonic()

    async def counts(self, name: str) -> Counts:
        st = await self._get(name, "/v1/status")
        by_state = st["members"]
        return Counts(
            int(st["member_count"]),
            int(by_state.get("alive", 0)),
            int(by_state.get("suspect", 0)),
            int(by_state.get("dead", 0)),
            (st.get("gossip") or {}).get("local_health"),
        )

    async def member(self, name: str, target: str) -> Member | None:
        body = await self._get(name, "/v1/members")  # no filter: the whole list
        for m in body["members"]:
            if m["name"] == target:
                return Member(target, m["state"], m.get("hostname"))
        return None

    def http_token(self, name: str) -> str:
        from meshd.state import DataDir  # the agent writes http.key when it starts

        return DataDir(self.datadir(name)).read_key("http").hex()

    async def update(self, name: str, label: str) -> int:
        headers = {"Authorization": f"Bearer {self.http_token(name)}"}
        status, body = await self._client().post_json(
            LOOPBACK, self.http[name], "/v1/record", {"hostname": label}, headers
        )
        if status != 200:
            raise RuntimeError(f"POST /v1/record: {status} {body.decode(errors='replace')}")
        return int(json.loads(body)["record_seq"])

    _KINDS: Final = {
        "member suspect": "suspected",
        "member dead": "declared_failed",
        "refuted a suspicion of this node": "refuted",
        "member updated": "updated",
    }

    def log_events(self, owner: str, text: str) -> list[LogEvent]:
        out = []
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            kind = self._KINDS.get(rec.get("event")) if isinstance(rec, dict) else None
            if kind is None:
                continue
            wall = None
            with contextlib.suppress(KeyError, ValueError, TypeError):
                wall = datetime.datetime.fromisoformat(rec["timestamp"]).timestamp()
            subject = owner if kind == "refuted" else str(rec.get("name") or "")
            seq = rec.get("seq") if isinstance(rec.get("seq"), int) else None
            out.append(LogEvent(kind, subject, wall, seq))
        return out

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def meshd_env(src: Path | None) -> dict[str, str]:
    """The environment of meshd children: ``src`` first on their path when given."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    return env


def export_commit(rev: str, dest: Path) -> str:
    """``git archive`` the meshd package of ``rev`` into ``dest``; the full commit id."""
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=repo, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "meshd"],
        cwd=repo, capture_output=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=60, check=True)
    return commit


def meshd_identity(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """Which meshd the children import, and its version."""
    res = subprocess.run(
        [sys.executable, "-c", "import meshd; print(meshd.__file__); print(meshd.__version__)"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    lines = res.stdout.split()
    return {"module": lines[0], "version": lines[1]} if len(lines) == 2 else {"error": res.stderr}


# --------------------------------------------------------------------------- polling


async def wait_until(check: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    """Call ``check`` every 50 ms until it is true; TimeoutError after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    for _ in range(int(limit_s / 0.05) + 1):
        if await check():
            return
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {limit_s:.0f} s")


@dataclass
class PolledSuspicions:
    """Agents that polled with suspect/dead members besides the ones killed, by phase.

    Counts-based, so it works for both systems with the cheap query: an *episode*
    starts when an agent that listed none starts listing one or more. Serf's counts
    have no suspect column (only failed), so for Serf this sees failures only.
    """

    phase: str = "startup"
    expected_dead: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    episodes: Counter[str] = field(default_factory=Counter)
    max_health: dict[str, int] = field(default_factory=dict)

    def observe(self, observer: str, c: Counts) -> None:
        bad = max(0, (c.suspect or 0) + c.dead - self.expected_dead)
        if bad and not self.bad.get(observer):
            self.episodes[self.phase] += 1
        self.bad[observer] = bad
        if c.health is not None:
            self.max_health[self.phase] = max(self.max_health.get(self.phase, 0), c.health)


@dataclass
class PollStats:
    rounds: int = 0
    requests: int = 0
    errors: int = 0
    round_ms: list[float] = field(default_factory=list)  # asking everyone once
    period_ms: list[float] = field(default_factory=list)  # round start to round start

    def summary(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "requests": self.requests,
            "errors": self.errors,
            "round_ms": summarise(self.round_ms),
            "period_ms": summarise(self.period_ms),
        }


async def poll(
    observers: Sequence[str],
    ask: Callable[[str], Awaitable[Any]],
    done: Callable[[Any], bool],
    *,
    limit_s: float,
    interval: float,
    rate: float,
    first: Callable[[Any], bool] | None = None,
    on_all_first: Callable[[], None] | None = None,
    observe: Callable[[str, Any], None] | None = None,
) -> tuple[dict[str, float], dict[str, float], PollStats]:
    """Ask every observer that has not met ``done`` yet, concurrently, round after round.

    A round starts ``max(interval, pending / rate)`` after the previous one started,
    or at once if that one took longer; at most ``limit_s`` in all. Returns the
    monotonic time at which each observer's first reply meeting ``done`` arrived, the
    same for the optional weaker condition ``first`` (``on_all_first`` is called once
    all have met it), and the stats.
    """
    pending = list(observers)
    met: dict[str, float] = {}
    met_first: dict[str, float] = {}
    stats = PollStats()
    deadline = time.monotonic() + limit_s

    async def one(name: str) -> tuple[float, Any]:
        reply = await asyncio.wait_for(ask(name), REQUEST_TIMEOUT_S)
        return time.monotonic(), reply

    for _ in range(int(limit_s / interval) + 2):
        if not pending or time.monotonic() >= deadline:
            break
        r0 = time.monotonic()
        period = max(interval, len(pending) / rate)
        replies = await asyncio.gather(*(one(o) for o in pending), return_exceptions=True)
        stats.rounds += 1
        stats.requests += len(pending)
        stats.round_ms.append((time.monotonic() - r0) * 1000)
        still = []
        for name, reply in zip(pending, replies, strict=True):
            if isinstance(reply, BaseException):
                if not isinstance(reply, Exception):
                    raise reply  # KeyboardInterrupt, CancelledError
                stats.errors += 1
                still.append(name)
                continue
            t, value = reply
            if observe is not None:
                observe(name, value)
            if first is not None and name not in met_first and first(value):
                met_first[name] = t
            if done(value):
                met[name] = t
                met_first.setdefault(name, t)
            else:
                still.append(name)
        pending = still
        if on_all_first is not None and len(met_first) == len(observers):
            on_all_first()
            on_all_first = None
        await asyncio.sleep(max(0.0, period - (time.monotonic() - r0)))
        stats.period_ms.append((time.monotonic() - r0) * 1000)
    return met, met_first, stats


async def snapshot(cluster: Cluster, sus: PolledSuspicions) -> dict[str, int]:
    """One round of counts from every live agent: suspect/dead members beyond the killed."""
    total: Counter[str] = Counter()

    async def one(name: str) -> None:
        with contextlib.suppress(Exception):
            c = await asyncio.wait_for(cluster.counts(name), REQUEST_TIMEOUT_S)
            sus.observe(name, c)
            total["suspect"] += c.suspect or 0
            total["dead"] += c.dead
            total["agents"] += 1

    live = [n for n in cluster.names if cluster.procs.alive(cluster.pids[n])]
    await asyncio.gather(*(one(n) for n in live))
    return dict(total)


# ------------------------------------------------------------------------ one cluster


async def measure_cluster(cluster: Cluster, settings: Settings, run_index: int) -> dict[str, Any]:
    """Start and measure one cluster (the caller's ``Processes`` stops it)."""
    s = settings
    sus = PolledSuspicions()
    out: dict[str, Any] = {"system": cluster.system, "nodes": cluster.n, "run": run_index}
    offsets: dict[str, dict[str, int]] = {}
    names = cluster.names
    n = cluster.n

    # 1. start-up and convergence
    out["load_average_at_start"] = load_average()
    t_start = time.monotonic()
    offsets["startup"] = cluster.log_offsets()
    t_launched = await cluster.launch()
    out["launch_s"] = round(t_launched - t_start, 3)
    if isinstance(cluster, MeshdCluster):
        out["meshd_join_ms"] = summarise(cluster.join_ms)

    def all_up() -> None:  # from here on every agent runs: any suspicion is false
        sus.phase = "convergence"
        offsets["convergence"] = cluster.log_offsets()

    met, up, stats = await poll(
        names, cluster.counts, lambda c: c.total == n and c.alive == n,
        limit_s=s.start_timeout_s, interval=s.poll_interval_s, rate=s.poll_rate,
        first=lambda c: c.total >= 2, on_all_first=all_up, observe=sus.observe,
    )  # fmt: skip
    out["poll_convergence"] = stats.summary()
    if len(up) == n:
        t_up = max(up.values())
        out["up_s"] = round(t_up - t_launched, 3)
        # each agent's convergence, from the moment all were up (0: already there)
        out["convergence_per_agent_s"] = sorted(round(max(0.0, t - t_up), 3) for t in met.values())
        if len(met) == n:
            t_conv = max(met.values())
            out["convergence_s"] = round(max(0.0, t_conv - t_up), 3)
            out["launch_to_converged_s"] = round(t_conv - t_launched, 3)
    out["not_converged"] = sorted(set(names) - set(met))
    if out["not_converged"]:
        return _finish(cluster, out, sus, offsets, set())

    # 2. idle window: nothing polls the agents
    await asyncio.sleep(s.settle_s)
    sus.phase = "idle"
    offsets["idle"] = cluster.log_offsets()
    before = await snapshot(cluster, sus)
    cpu0 = {m: cpu_seconds(cluster.pids[m]) for m in names}
    load0 = load_average()
    t0 = time.monotonic()
    await asyncio.sleep(s.idle_s)
    elapsed = time.monotonic() - t0
    cpu1 = {m: cpu_seconds(cluster.pids[m]) for m in names}
    rss = {m: rss_kib(cluster.pids[m]) for m in names}
    load1 = load_average()
    after = await snapshot(cluster, sus)
    cpu = {
        m: round(c1 - c0, 3)
        for m in names
        if (c0 := cpu0[m]) is not None and (c1 := cpu1[m]) is not None
    }
    rss_known = [v for v in rss.values() if v]
    out["idle"] = {
        "seconds": round(elapsed, 3),
        "cpu_s_per_agent": cpu,
        "rss_kib_per_agent": rss,
        "cpu_pct_per_agent_median": round(statistics.median(cpu.values()) / elapsed * 100, 3),
        "cpu_pct_per_agent_max": round(max(cpu.values()) / elapsed * 100, 3),
        "cpu_cores_total": round(sum(cpu.values()) / elapsed, 3),
        "rss_mib_per_agent_median": round(statistics.median(rss_known) / 1024, 1),
        "rss_mib_total": round(sum(rss_known) / 1024, 1),
        "load_average": {"before": load0, "after": load1},
        "counts_before": before,
        "counts_after": after,
    }

    # 3. dissemination. First agent-stamped, with nothing polling the agents.
    updater = names[-1]
    sus.phase = "dissemination"
    offsets["dissemination"] = cluster.log_offsets()
    want = n
    t_wall = time.time()
    if isinstance(cluster, SerfCluster):
        payload = f"r{run_index}-{time.time_ns()}"
        t_wall = time.time()
        await asyncio.wait_for(cluster.user_event(updater, payload), REQUEST_TIMEOUT_S)
        how = "Serf user event; event handler stamps (all agents, the sender included)"

        def read() -> dict[str, float]:
            return {k: v / 1e9 for k, v in cluster.event_times(payload).items()}

    else:
        assert isinstance(cluster, MeshdCluster)
        since = cluster.log_offsets()
        t_wall = time.time()
        seq = await asyncio.wait_for(
            cluster.update(updater, f"a{run_index}x{n}"), REQUEST_TIMEOUT_S
        )
        how = 'POST /v1/record; "member updated" log stamps (every agent but the updater)'
        want = n - 1  # the updater does not log its own record

        def read() -> dict[str, float]:
            return _first_log_times(cluster, since, "updated", updater, min_seq=seq)

    stamps = await _wait_stamps(read, want, s.update_timeout_s)
    delays = sorted(v - t_wall for v in stamps.values())
    out["dissemination_stamped"] = {
        "how": how,
        "reached": len(delays),
        "first_s": round(delays[0], 4) if delays else None,
        "last_s": round(delays[-1], 4) if len(delays) >= want else None,
    }

    # ... then polled, the same way for both: a label change until every agent shows it.
    await asyncio.sleep(1.0)
    label = f"p{run_index}x{n}"
    t_update = time.monotonic()
    await asyncio.wait_for(cluster.update(updater, label), REQUEST_TIMEOUT_S)
    met, _, stats = await poll(
        names, lambda o: cluster.member(o, updater),
        lambda m: m is not None and m.label == label,
        limit_s=s.update_timeout_s, interval=s.poll_interval_s, rate=s.poll_rate,
    )  # fmt: skip
    out["poll_dissemination"] = stats.summary()
    out["dissemination_polled_reached"] = len(met)
    if len(met) == n:
        out["dissemination_polled_s"] = round(max(met.values()) - t_update, 3)
        out["dissemination_polled_first_s"] = round(min(met.values()) - t_update, 3)

    # 4. failure detection: SIGKILL one agent, poll the cheap counts (dead/failed >= 1:
    # nothing else was killed), then check once that it is the victim that is dead.
    await asyncio.sleep(1.0)
    victim = names[n // 2]
    observers = [m for m in names if m != victim]
    sus.phase = "failure"
    offsets["failure"] = cluster.log_offsets()
    t_wall = time.time()
    t_kill = time.monotonic()
    cluster.procs.kill(cluster.pids[victim])
    met, _, stats = await poll(
        observers, cluster.counts, lambda c: c.dead >= 1,
        limit_s=s.failure_timeout_s, interval=s.poll_interval_s, rate=s.poll_rate,
    )  # fmt: skip
    out["poll_failure"] = stats.summary()
    out["victim"] = victim
    out["failure_detected_by"] = len(met)
    if met:
        out["failure_first_s"] = round(min(met.values()) - t_kill, 3)
    if len(met) == len(observers):
        out["failure_detection_s"] = round(max(met.values()) - t_kill, 3)
    views = await asyncio.gather(
        *(asyncio.wait_for(cluster.member(o, victim), REQUEST_TIMEOUT_S) for o in observers),
        return_exceptions=True,
    )
    out["failure_victim_dead_in"] = sum(
        1 for v in views if isinstance(v, Member) and v.state == "dead"
    )
    if isinstance(cluster, MeshdCluster):
        stamps = _first_log_times(cluster, offsets["failure"], "declared_failed", victim)
        delays = sorted(v - t_wall for v in stamps.values())
        out["failure_stamped"] = {
            "how": 'meshd "member dead" log stamps',
            "reached": len(delays),
            "first_s": round(delays[0], 4) if delays else None,
            "last_s": round(delays[-1], 4) if len(delays) == len(observers) else None,
        }
    await asyncio.sleep(1.0)  # let the last gossip settle before the final count
    sus.expected_dead = 1
    out["counts_after_failure"] = await snapshot(cluster, sus)
    return _finish(cluster, out, sus, offsets, {victim})


async def _wait_stamps(
    read: Callable[[], dict[str, float]], want: int, limit_s: float
) -> dict[str, float]:
    """Re-read local stamp files or logs every 50 ms until ``want`` agents have one."""
    got: dict[str, float] = {}
    deadline = time.monotonic() + limit_s
    for _ in range(int(limit_s / 0.05) + 1):
        got = read()
        if len(got) >= want or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return got


def _read_segment(path: Path, start: int, end: int | None) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except OSError:
        return ""
    return data.decode(errors="replace")


def _first_log_times(
    cluster: Cluster, since: dict[str, int], kind: str, subject: str, min_seq: int = 0
) -> dict[str, float]:
    """Per agent, the wall time of its first ``kind`` line about ``subject`` since ``since``
    (for "updated": of a record sequence number ``min_seq`` or later)."""
    out = {}
    for owner, path in cluster.logs.items():
        for ev in cluster.log_events(owner, _read_segment(path, since.get(owner, 0), None)):
            if (
                ev.kind == kind
                and ev.subject == subject
                and ev.wall is not None
                and (ev.seq or 0) >= min_seq
            ):
                out[owner] = ev.wall
                break
    return out


def _finish(
    cluster: Cluster,
    out: dict[str, Any],
    sus: PolledSuspicions,
    offsets: dict[str, dict[str, int]],
    killed: set[str],
) -> dict[str, Any]:
    """Add the false suspicions, from the logs by phase and from polling, to ``out``."""
    phases = list(offsets)
    ends = cluster.log_offsets()
    by_phase: dict[str, dict[str, int]] = {}
    subjects: dict[str, set[str]] = {}
    examples: list[str] = []
    for i, phase in enumerate(phases):
        stop = offsets[phases[i + 1]] if i + 1 < len(phases) else ends
        counts: Counter[str] = Counter()
        suspected: set[str] = set()
        for owner, path in cluster.logs.items():
            text = _read_segment(path, offsets[phase].get(owner, 0), stop.get(owner, 0))
            for ev in cluster.log_events(owner, text):
                if ev.kind == "updated" or ev.subject in killed:
                    continue  # not a suspicion, or the real failure
                counts[ev.kind] += 1
                suspected.add(ev.subject)
                if len(examples) < 20:
                    examples.append(f"{phase}: {owner}: {ev.kind} {ev.subject}")
        by_phase[phase] = dict(counts)
        subjects[phase] = suspected
    after_up = [p for p in phases if p != "startup"]

    def total(kind: str, among: Iterable[str]) -> int:
        return sum(by_phase[p].get(kind, 0) for p in among)

    out["false_suspicions"] = {
        "logs_by_phase": by_phase,
        "members_concerned_by_phase": {p: sorted(v) for p, v in subjects.items()},
        "polled_episodes_by_phase": dict(sus.episodes),
        "max_lifeguard_health_by_phase": sus.max_health,
        "examples": examples,
    }
    out["refutations_idle"] = total("refuted", ["idle"])
    out["refutations_after_up"] = total("refuted", after_up)
    out["false_failures_after_up"] = total("declared_failed", after_up)
    out["suspect_lines_after_up"] = total("suspected", after_up)
    out["polled_episodes_after_up"] = sum(v for p, v in sus.episodes.items() if p != "startup")
    out["suspicion_lines_startup"] = sum(by_phase.get("startup", {}).values())
    return out


# ----------------------------------------------------------------------------- driver

#: (key, label, unit) of every figure in the summary table, in order.
METRICS: Final = (
    ("convergence_s", "convergence after all up", "s"),
    ("launch_to_converged_s", "  from last process spawn", "s"),
    ("dissemination_stamped_s", "dissemination, agent-stamped (1)", "s"),
    ("dissemination_polled_s", "dissemination, polled (2)", "s"),
    ("failure_detection_s", "failure detection, last agent", "s"),
    ("failure_first_s", "  first agent", "s"),
    ("idle_cpu_pct", "idle CPU per agent (median)", "%"),
    ("idle_cpu_cores", "idle CPU, all agents", "cores"),
    ("idle_rss_mib", "RSS per agent (median)", "MiB"),
    ("refutations_idle", "refuted suspicions, idle window", "#"),
    ("refutations_after_up", "refuted suspicions, after all up", "#"),
    ("false_failures_after_up", "false failed/dead declarations (3)", "#"),
    ("suspect_lines_after_up", "suspicion log lines (4)", "#"),
    ("polled_episodes_after_up", "polled suspect/failed episodes", "#"),
)

NOTES: Final = (
    "(1) Serf: user event, time stamped by each agent's event handler; meshd: time of each "
    'agent\'s "member updated" log line (structlog, microseconds)',
    "(2) Serf: tag change (RPC tags) until every agent's members-filtered shows it; meshd: "
    "POST /v1/record until every agent's /v1/members shows the new hostname",
    "(3) lines (agent x member) declaring a member that was never killed failed (Serf "
    'EventMemberFailed) or dead (meshd "member dead"), after all agents were up',
    '(4) Serf: "Suspect X has failed" (logged by the prober only); meshd: "member suspect" '
    "(logged by every agent that marks X suspect): not comparable one to one",
)


def _flat(run: dict[str, Any]) -> dict[str, float | None]:
    idle = run.get("idle") or {}
    done = "failure_detected_by" in run  # the run got through every phase
    return {
        "convergence_s": run.get("convergence_s"),
        "launch_to_converged_s": run.get("launch_to_converged_s"),
        "dissemination_stamped_s": (run.get("dissemination_stamped") or {}).get("last_s"),
        "dissemination_polled_s": run.get("dissemination_polled_s"),
        "failure_detection_s": run.get("failure_detection_s"),
        "failure_first_s": run.get("failure_first_s"),
        "idle_cpu_pct": idle.get("cpu_pct_per_agent_median"),
        "idle_cpu_cores": idle.get("cpu_cores_total"),
        "idle_rss_mib": idle.get("rss_mib_per_agent_median"),
        "refutations_idle": run.get("refutations_idle") if idle else None,
        "refutations_after_up": run.get("refutations_after_up") if done else None,
        "false_failures_after_up": run.get("false_failures_after_up") if done else None,
        "suspect_lines_after_up": run.get("suspect_lines_after_up") if done else None,
        "polled_episodes_after_up": run.get("polled_episodes_after_up") if done else None,
    }


def _median(values: Iterable[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    flats = [_flat(r) for r in runs]
    return {
        key: {"median": _median(f[key] for f in flats), "per_run": [f[key] for f in flats]}
        for key, _, _ in METRICS
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def serf_version() -> str | None:
    """The binary's own version line and the Debian package version."""
    try:
        res = subprocess.run(
            ["serf", "version"], capture_output=True, text=True, timeout=10, check=False
        )
        pkg = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "serf"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    binary = res.stdout.splitlines()[0].strip() if res.stdout else "?"
    return f"{binary}, Debian package {pkg.stdout.strip() or '?'}"


async def _run_all(
    settings: Settings,
    root: Path,
    procs: Processes,
    keep_logs: Path | None,
    src: Path | None,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in settings.nodes:
        per_system: dict[str, list[dict[str, Any]]] = {name: [] for name in settings.systems}
        for r in range(settings.runs):
            order = list(settings.systems) if r % 2 == 0 else list(reversed(settings.systems))
            for system in order:
                ports = PortPool()
                where = root / f"{system}-n{n}-r{r}"
                where.mkdir()
                cluster: Cluster = (
                    SerfCluster(where, n, procs, ports, settings.start_concurrency)
                    if system == "serf"
                    else MeshdCluster(
                        where,
                        n,
                        procs,
                        ports,
                        settings.join_concurrency,
                        src,
                        start_concurrency=settings.start_concurrency,
                    )
                )
                print(f"  {system} N={n} run {r + 1}/{settings.runs} ...", flush=True)
                t0 = time.monotonic()
                try:
                    res = await measure_cluster(cluster, settings, r)
                except Exception as exc:  # one broken run must not cost the others' figures
                    traceback.print_exc()
                    res = {
                        "system": system, "nodes": n, "run": r,
                        "error": f"{type(exc).__name__}: {exc}",
                    }  # fmt: skip
                finally:
                    await cluster.close()
                    procs.stop_all()
                    if keep_logs is not None:
                        dest = keep_logs / where.name
                        dest.mkdir(parents=True, exist_ok=True)
                        for path in cluster.logs.values():
                            if path.exists():
                                shutil.copy2(path, dest / path.name)
                res["wall_s"] = round(time.monotonic() - t0, 1)
                print(f"    {_one_line(res)}", flush=True)
                per_system[system].append(res)
        entry: dict[str, Any] = {}
        for system, runs in per_system.items():
            entry[system] = {"summary": summarise_runs(runs), "runs": runs}
        if "serf" in entry and "meshd" in entry:
            entry["ratio_meshd_over_serf"] = {
                key: _ratio(
                    entry["meshd"]["summary"][key]["median"],
                    entry["serf"]["summary"][key]["median"],
                )
                for key, _, _ in METRICS
            }
        results[str(n)] = entry
    return results


def _one_line(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"error: {res['error']} ({res.get('wall_s', '?')} s)"
    parts = [f"{k}={v}" for k, v in _flat(res).items() if v is not None]
    if res.get("not_converged"):
        parts.append(f"not converged: {len(res['not_converged'])} agents")
    return ", ".join(parts) + f" ({res.get('wall_s', '?')} s)"


def run(
    quick: bool = False, settings: Settings | None = None, keep_logs: Path | None = None
) -> dict[str, Any]:
    """Every cluster size, every repetition, both systems; the results dict."""
    settings = settings or Settings.for_mode(quick)
    if "serf" in settings.systems and shutil.which("serf") is None:
        raise RuntimeError("serf is not installed (apt-get install serf, or make bench-deps)")
    procs = Processes()
    with (
        sigterm_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="meshd-vs-serf-") as tmp,
        bytecode_cache(Path(tmp) / "pycache") as env_before,
    ):
        root = Path(tmp)
        src: Path | None = None
        meshd: dict[str, str] = {"source": "the checkout (as installed in the venv)"}
        if settings.meshd_commit and "meshd" in settings.systems:
            src = root / "src"
            commit = export_commit(settings.meshd_commit, src)
            meshd = {"source": f"git archive {settings.meshd_commit}", "commit": commit}
        try:
            if "meshd" in settings.systems:
                meshd.update(meshd_identity(meshd_env(src), root))
                subprocess.run(  # untimed: fills the bytecode cache for the agents
                    [sys.executable, "-m", "meshd", "--version"],
                    env=meshd_env(src),
                    cwd=root,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            results = asyncio.run(_run_all(settings, root, procs, keep_logs, src))
        finally:
            procs.stop_all()
    return {
        "benchmark": NAME,
        "mode": "quick" if quick else "full",
        "settings": asdict(settings),
        "meshd": meshd,
        "serf_version": serf_version(),
        "environment": env_before,
        "notes": list(NOTES),
        "results": results,
    }


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "#":
        return f"{v:g}"
    if unit in ("%", "cores"):
        return f"{v:.2f}"
    if unit == "MiB":
        return f"{v:.1f}"
    return f"{v:.3f}"


def format_summary(res: dict[str, Any]) -> str:
    """One table per cluster size: medians of the runs and the meshd/Serf ratio."""
    s = res["settings"]
    lines = [
        f"meshd vs Serf ({res.get('serf_version') or 'serf ?'}) on 127.0.0.1, LAN timers, "
        f"medians of {s['runs']} run(s)",
        f"  polled figures are late by up to one poll round: every "
        f"{s['poll_interval_s'] * 1000:.0f} ms, slower while more than "
        f"{s['poll_rate'] * s['poll_interval_s']:.0f} agents wait (at most "
        f"{s['poll_rate']:.0f} requests/s); median round periods below",
        (
            f"  start-up: at most {s['start_concurrency']} agents starting at once"
            if s.get("start_concurrency")
            else "  start-up: every agent spawned at once"
        ),
    ]
    source = res.get("meshd") or {}
    if source:
        lines.append(
            f"  meshd {source.get('version', '?')} from {source.get('source', '?')}"
            + (f" = {source['commit'][:12]}" if source.get("commit") else "")
        )
    for n, entry in res["results"].items():
        lines.append(f"  N={n}")
        lines.append(f"    {'metric':<38} {'unit':>5} {'serf':>9} {'meshd':>9} {'meshd/serf':>10}")
        ratios = entry.get("ratio_meshd_over_serf", {})
        for key, label, unit in METRICS:
            serf = entry.get("serf", {}).get("summary", {}).get(key, {}).get("median")
            meshd = entry.get("meshd", {}).get("summary", {}).get(key, {}).get("median")
            ratio = ratios.get(key)
            lines.append(
                f"    {label:<38} {unit:>5} {_fmt(serf, unit):>9} {_fmt(meshd, unit):>9} "
                f"{(f'{ratio:.2f}' if ratio is not None else '-'):>10}"
            )
        for system in ("serf", "meshd"):
            runs = entry.get(system, {}).get("runs", [])
            notes = []
            for phase in ("convergence", "dissemination", "failure"):
                got = [
                    r[f"poll_{phase}"]["period_ms"]["median"]
                    for r in runs
                    if r.get(f"poll_{phase}", {}).get("period_ms", {}).get("median") is not None
                ]
                if got:
                    notes.append(f"{phase} {statistics.median(got):.0f}")
            line = f"poll period ms (median): {', '.join(notes)}" if notes else ""
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                line += f"; {len(errors)} run(s) failed: {errors[0]}"
            unconverged = [r for r in runs if r.get("not_converged")]
            if unconverged:
                line += f"; {len(unconverged)} run(s) did not converge"
            if line:
                lines.append(f"    {system}: {line}")
    lines += [f"  {note}" for note in res.get("notes", [])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vs_serf",
        description="meshd vs HashiCorp Serf on loopback (numbers, not tests)",
    )
    parser.add_argument("--nodes", default="30,100", help="cluster sizes (default 30,100)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per size and system")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, s (default 30)")
    parser.add_argument(
        "--poll-interval", type=float, default=0.05, help="s between poll rounds (default 0.05)"
    )
    parser.add_argument(
        "--poll-rate", type=float, default=400.0, help="requests/s cap, all agents (default 400)"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="serf,meshd (default)")
    parser.add_argument(
        "--start-concurrency",
        type=int,
        default=Settings().start_concurrency,
        help="agents starting at once (default: CPU count); 0: all at once",
    )
    parser.add_argument(
        "--meshd-commit",
        metavar="REV",
        help="run meshd from this commit (git archive into the temp dir), not the checkout",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy every agent's log under this dir")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    systems = tuple(x.strip() for x in args.systems.split(",") if x.strip())
    if not systems or set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: choose from {', '.join(SYSTEMS)}")
    try:
        nodes = tuple(int(x) for x in args.nodes.split(",") if x.strip())
    except ValueError:
        raise SystemExit("--nodes: comma-separated integers, e.g. 30,100") from None
    if not nodes or min(nodes) < 3 or args.runs < 1:
        raise SystemExit("--nodes: sizes of at least 3; --runs: at least 1")
    if args.start_concurrency < 0:
        raise SystemExit("--start-concurrency: 0 (all at once) or more")
    if min(args.idle, args.poll_interval, args.poll_rate) <= 0:
        raise SystemExit("--idle, --poll-interval and --poll-rate must be positive")
    settings = Settings(
        nodes=nodes,
        runs=args.runs,
        idle_s=args.idle,
        poll_interval_s=args.poll_interval,
        poll_rate=args.poll_rate,
        systems=systems,
        start_concurrency=args.start_concurrency,
        meshd_commit=args.meshd_commit,
    )
    started, load_before, t0 = timestamp(), load_average(), time.monotonic()
    result = run(settings=settings, keep_logs=args.keep_logs)
    result.update(
        timestamp=started,
        duration_s=round(time.monotonic() - t0, 1),
        machine=machine_info(),
        load_average={"before": load_before, "after": load_average()},
    )
    path = write_json(NAME, result, args.results_dir)
    print()
    print(format_summary(result))
    print(f"  ({result['duration_s']} s; written to {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
