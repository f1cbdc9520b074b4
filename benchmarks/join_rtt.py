"""Join round-trip time on loopback against real agents (``meshd run`` processes).

Two different things are timed, because they answer different questions:

* **CLI**: the wall time of a whole ``meshd join`` command, which is what an
  operator waits for: Python start-up and imports, key generation, the protocol,
  and writing the new data directory (keys and state, fsynced). The start-up
  alone (``python -c pass``, ``python -m meshd --version``) is timed as well so
  it can be subtracted.
* **protocol**: a ``JoinClient`` driven by an asyncio UDP socket in this process
  (``meshd.agent.drive_join``, the adapter ``meshd join`` uses), timed around it:
  opening the socket (~0.1 ms), then from the first request to ``JoinSucceeded``:
  cookie round trip, signed request, the seed's work (token check, address
  assignment, state write with fsync, sealing the grant), and decrypting and
  checking the grant. Cases:

  - ``leader``: the seed is the leader, which issued the token and holds the CA;
  - ``member_warm``: the seed is a joined, running member that already holds a
    block, so each join adds one ``tok_use`` round trip to the token's issuer
    (the leader);
  - ``member_cold``: the seed is a member that has just joined and started and
    holds no block, so each join also waits for a ``lease`` round trip to the
    leader. A fresh member per join; each is stopped after its one join.

Everything runs on 127.0.0.1 in a temporary directory; every agent started is
stopped (``LocalCluster.stop_all``) however the run ends. Tokens are minted by the
leader with as many uses as the case needs: the seed's work per join is the same
as with single-use tokens (one ledger entry per joiner).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks.common import summarise
from meshd.agent import drive_join
from meshd.core.crypto import SigningKey, WireGuardKey
from meshd.core.join import JoinClient, JoinFailed
from meshd.core.wire import Kind
from meshd.demo import LocalCluster
from meshd.state import atomic_write

NAME: Final = "join_rtt"
LOOPBACK: Final = "127.0.0.1"
#: A protocol join that takes longer than this is reported as failed (the CLI default is 30 s).
JOIN_TIMEOUT_S: Final = 10.0
#: Upper bound on timer wake-ups while driving one join (each re-sends at most one request).
_KINDS: Final = {k.value: k.name.lower() for k in Kind}


@dataclass(frozen=True)
class Settings:
    """Joins per case and the wall-clock budget of each case."""

    joins: int
    startup_runs: int
    budget_s: float  # per case; further joins are skipped once it is spent

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(joins=15, startup_runs=5, budget_s=90.0)
        return cls(joins=30, startup_runs=15, budget_s=180.0)


@dataclass
class JoinSample:
    """One protocol join as the joiner saw it."""

    ms: float | None  # None: the join did not succeed
    requests: int  # JOIN_REQUESTs sent (2 = no retry: one without, one with the cookie)
    received: dict[str, int]  # datagrams received, by kind
    error: str | None = None


async def timed_join(token: str, seed: tuple[str, int], name: str) -> JoinSample:
    """Join through ``seed`` once with a fresh identity; time the whole adapter call.

    Key generation happens before the clock starts; everything the joiner does after
    (signing the request, decrypting and verifying the grant) is inside it.
    """
    received: Counter[str] = Counter()
    sent = 0
    sign, wg = SigningKey(os.urandom(32)), WireGuardKey(os.urandom(32))
    client = JoinClient(
        token=token,
        seeds=[seed],
        sign=sign,
        wg_key=wg.public,
        reply_key=WireGuardKey(os.urandom(32)),
        request_id=os.urandom(16),
        name=name,
        hostname=None,
        endpoints=[f"{LOOPBACK}:9"],
        now=time.time(),
        timeout=JOIN_TIMEOUT_S,
    )

    def on_send(data: bytes) -> None:
        nonlocal sent
        sent += 1

    def on_receive(data: bytes) -> None:
        received[_KINDS.get(data[1], "other") if len(data) > 1 else "other"] += 1

    t_start = time.perf_counter()
    event = await drive_join(client, on_send=on_send, on_receive=on_receive)
    t_end = time.perf_counter()
    if isinstance(event, JoinFailed):
        return JoinSample(None, sent, dict(received), event.reason)
    return JoinSample((t_end - t_start) * 1000, sent, dict(received))


def _case_summary(samples: list[JoinSample], **extra: Any) -> dict[str, Any]:
    ok = [s.ms for s in samples if s.ms is not None]
    return {
        "ms": summarise(ok),
        "attempted": len(samples),
        "succeeded": len(ok),
        "retried": sum(1 for s in samples if s.requests > 2),
        "try_again": sum(1 for s in samples if s.received.get("join_error")),
        "samples": [asdict(s) for s in samples],
        **extra,
    }


def _wall_ms(
    argv: list[str], runs: int, budget_s: float, env: dict[str, str] | None = None
) -> list[float]:
    """Wall time of a short command, ``runs`` times (fewer if the budget runs out)."""
    out: list[float] = []
    start = time.monotonic()
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, timeout=30, check=True, env=env)
        out.append((time.perf_counter() - t0) * 1000)
        if time.monotonic() - start > budget_s:
            break
    return out


def _state_write_ms(root: Path, runs: int, budget_s: float = 10.0) -> list[float]:
    """``atomic_write`` (write, fsync, rename, fsync dir) of a 4 KiB file: the seed's commit."""
    path = root / "fsync-probe.json"
    out: list[float] = []
    start = time.monotonic()
    for _ in range(runs):
        t0 = time.perf_counter()
        atomic_write(path, os.urandom(4096))
        out.append((time.perf_counter() - t0) * 1000)
        if time.monotonic() - start > budget_s:
            break
    path.unlink()
    return out


@contextlib.contextmanager
def bytecode_cache(prefix: Path) -> Iterator[dict[str, str | None]]:
    """Let child Pythons cache bytecode under ``prefix`` while the benchmark runs.

    An installed meshd has its ``.pyc`` files; a checkout run with
    ``PYTHONDONTWRITEBYTECODE=1`` (as some CI and sandbox environments set) would
    recompile every module at each ``meshd`` start and inflate the CLI figure by
    that. The cache goes to a temporary prefix so nothing is written next to the
    sources. Yields the variables as they were, and restores them afterwards.
    """
    names = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    before = {k: os.environ.get(k) for k in names}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    try:
        yield before
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check(res: subprocess.CompletedProcess[str], what: str) -> None:
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed: {res.stderr.strip()}")


def _protocol_case(
    token: str, seed: tuple[str, int], joins: int, budget_s: float, prefix: str
) -> list[JoinSample]:
    """``joins`` protocol joins through one seed, one after another, within ``budget_s``."""

    async def go() -> list[JoinSample]:
        samples: list[JoinSample] = []
        start = time.monotonic()
        for i in range(joins):
            samples.append(await timed_join(token, seed, f"{prefix}-{i}"))
            if time.monotonic() - start > budget_s:
                break
        return samples

    return asyncio.run(go())


def run(quick: bool = False) -> dict[str, Any]:
    """Start a leader and a member, time every case, stop everything; return the results."""
    settings = Settings.for_mode(quick)
    n = settings.joins
    cases: dict[str, Any] = {}
    context: dict[str, Any] = {}
    py = sys.executable
    version = [py, "-m", "meshd", "--version"]
    runs = settings.startup_runs
    with (
        tempfile.TemporaryDirectory(prefix="meshd-bench-") as tmp,
        bytecode_cache(Path(tmp) / "pycache") as env_before,
    ):
        root = Path(tmp)
        context["environment"] = env_before
        context["python_startup_ms"] = summarise(_wall_ms([py, "-c", "pass"], runs, 60))
        # as a checkout runs without a cache: .pyc files only where they already exist
        no_cache = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
        no_cache["PYTHONDONTWRITEBYTECODE"] = "1"
        context["meshd_version_dont_write_bytecode_ms"] = summarise(
            _wall_ms(version, runs, 60, no_cache)
        )
        _wall_ms(version, 1, 60)  # untimed: fills the bytecode cache
        context["meshd_version_ms"] = summarise(_wall_ms(version, runs, 60))
        context["state_write_fsync_ms"] = summarise(_state_write_ms(root, 15))
        cluster = LocalCluster(root / "cluster")
        cluster.root.mkdir()
        try:
            _check(cluster.init("leader"), "meshd init")
            cluster.start("leader")
            _check(cluster.join("member", "leader", cluster.token("leader")), "meshd join")
            cluster.start("member")
            cluster.wait_converged(["leader", "member"])
            leader = (LOOPBACK, cluster.udp["leader"])
            member = (LOOPBACK, cluster.udp["member"])

            # warm-up: the member leases its first block here, untimed
            warmup = _protocol_case(cluster.token("leader", "--uses", "1"), member, 1, 30, "warmup")
            if warmup[0].ms is None:
                raise RuntimeError(f"warm-up join through the member failed: {warmup[0].error}")

            token = cluster.token("leader", "--uses", str(n))
            cases["leader"] = _case_summary(
                _protocol_case(token, leader, n, settings.budget_s, "lead"),
                seed="leader (token issuer, CA holder)",
            )
            token = cluster.token("leader", "--uses", str(n))
            cases["member_warm"] = _case_summary(
                _protocol_case(token, member, n, settings.budget_s, "warm"),
                seed="member holding a block; tok_use round trip to the leader",
            )

            # CLI joins through the leader; each new node then serves one cold join
            cli_ms: list[float] = []
            cold: list[JoinSample] = []
            cli_token = cluster.token("leader", "--uses", str(n))
            join_token = cluster.token("leader", "--uses", str(n))
            start = time.monotonic()
            for i in range(n):
                name = f"cold{i}"
                t0 = time.perf_counter()
                res = cluster.join(name, "leader", cli_token)
                cli_ms.append((time.perf_counter() - t0) * 1000)
                _check(res, f"meshd join {name}")
                cluster.start(name)
                seed = (LOOPBACK, cluster.udp[name])
                cold += _protocol_case(join_token, seed, 1, JOIN_TIMEOUT_S + 5, f"c{i}")
                cluster.stop(name)
                if time.monotonic() - start > settings.budget_s:
                    break
            cases["member_cold"] = _case_summary(
                cold, seed="member just started, no block: tok_use + lease round trips"
            )
            cases["cli_leader"] = {
                "ms": summarise(cli_ms),
                "attempted": len(cli_ms),
                "samples_ms": cli_ms,
                "seed": "leader; `meshd join` as a subprocess, whole command wall time",
            }
            context["members_in_leader_view"] = len(cluster.get("leader", "/v1/members")["members"])
        finally:
            cluster.stop_all()
    return {
        "benchmark": NAME,
        "mode": "quick" if quick else "full",
        "settings": asdict(settings),
        "cases": cases,
        "context": context,
    }


def format_summary(res: dict[str, Any]) -> str:
    """Human-readable table of every case in milliseconds, then the context figures."""
    lines = [
        "join round trip on 127.0.0.1 (ms)",
        f"  {'case':<14} {'median':>8} {'p90':>8} {'min':>8} {'max':>8} {'n':>4}  notes",
    ]
    for key, case in res["cases"].items():
        ms = case["ms"]
        if not ms["n"]:
            lines.append(f"  {key:<14} {'-':>8}  no successful join")
            continue
        notes = []
        if case.get("succeeded", ms["n"]) < case["attempted"]:
            notes.append(f"{case['attempted'] - case['succeeded']} failed")
        if case.get("retried"):
            notes.append(f"{case['retried']} retried")
        if case.get("try_again"):
            notes.append(f"{case['try_again']} waited for a lease (TRY_AGAIN)")
        lines.append(
            f"  {key:<14} {ms['median']:>8.1f} {ms['p90']:>8.1f} {ms['min']:>8.1f} "
            f"{ms['max']:>8.1f} {ms['n']:>4}  {', '.join(notes)}"
        )
    ctx = res["context"]
    lines.append(
        f"  context (medians): python -c pass {ctx['python_startup_ms']['median']:.0f} ms, "
        f"meshd --version {ctx['meshd_version_ms']['median']:.0f} ms "
        f"({ctx['meshd_version_dont_write_bytecode_ms']['median']:.0f} ms with "
        f"PYTHONDONTWRITEBYTECODE=1), "
        f"atomic state write {ctx['state_write_fsync_ms']['median']:.2f} ms"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_summary(run(quick=True)))
