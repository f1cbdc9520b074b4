"""Scenario files: one TOML file describes a whole simulated run.

A scenario is data, not code, so that a result can always be traced to the exact
file (and seed) that produced it, and so that a new experiment needs no Python.
Every key is checked: a misspelt key is an error naming it, not a silent default.
Times are simulated seconds from the moment the cluster starts (t = 0).

See ``simulations/README.md`` for the format with an example of every table.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.core.membership import PROFILES, Timing

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
#: The set ``python -m simulations.run --all`` runs, in this order.
STANDARD = (
    "crash_1000",
    "loss10_500",
    "slow_nodes_500",
    "partition_200",
    "dissemination_1000",
    "scale_10000_60s",
)


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Latency:
    """One-way delay of every link: ``uniform`` in [min, max], or ``lognormal`` with the
    given median and sigma (a long right tail, as real networks have), clipped to
    [min, max] so one unlucky draw cannot stall a simulation."""

    dist: str = "uniform"
    min: float = 0.0002
    max: float = 0.001
    median: float = 0.0005
    sigma: float = 0.5


@dataclass(frozen=True)
class Crash:
    """Node ``node`` (or a random non-seed node) stops at ``at``; optionally restarts at
    ``restart_at`` as a new instance with a higher incarnation and the same id."""

    at: float
    node: int | None = None
    restart_at: float | None = None


@dataclass(frozen=True)
class Partition:
    """Between ``start`` and ``end`` no datagram crosses from side A to side B (and, unless
    ``one_way``, none from B to A). Side A is ``nodes`` or a random ``fraction``."""

    start: float
    end: float
    fraction: float = 0.5
    nodes: tuple[int, ...] = ()
    one_way: bool = False


@dataclass(frozen=True)
class Slow:
    """``count`` random nodes handle every inbound datagram late by a delay drawn uniformly
    from [delay_min, delay_max], in arrival order (a CPU-starved process with a full
    socket buffer: the slow-member anomaly of the Lifeguard paper's evaluation)."""

    count: int = 0
    nodes: tuple[int, ...] = ()
    delay_min: float = 0.5
    delay_max: float = 1.0
    start: float = 0.0
    end: float = math.inf


@dataclass(frozen=True)
class Broadcast:
    """``count`` record updates, ``every`` seconds apart from ``at``, each by ``node`` (or
    a random live node): the node publishes its record at seq + 1 as ``Node.announce``
    does, and the time until other nodes hold that version is the dissemination metric.
    Updates of one ``group`` are also summarised apart (default: ``broadcast<k>``)."""

    at: float
    node: int | None = None
    count: int = 1
    every: float = 1.0
    group: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: int
    duration: float
    description: str = ""
    seed: int = 1
    profile: str = "lan"
    timing: Mapping[str, Any] = field(default_factory=dict)
    bootstrap: str = "full"  # "full" (every view complete at t=0) or "seeds"
    seeds: int = 3
    join_window: float = 10.0
    latency: Latency = Latency()
    loss: float = 0.0
    crashes: tuple[Crash, ...] = ()
    partitions: tuple[Partition, ...] = ()
    slow: Slow = Slow()
    broadcasts: tuple[Broadcast, ...] = ()
    compare_lifeguard: bool = False
    wire: bool = False
    bytes_sample: int = 1
    sample_interval: float = 1.0
    max_events: int = 500_000_000

    def build_timing(self, lifeguard: bool | None = None) -> Timing:
        """The profile with this scenario's overrides (and an optional Lifeguard switch)."""
        overrides = dict(self.timing)
        if lifeguard is not None:
            overrides["lifeguard"] = lifeguard
        try:
            return dataclasses.replace(PROFILES[self.profile], **overrides)
        except (TypeError, ValueError) as exc:
            raise ScenarioError(f"{self.name}: bad [timing]: {exc}") from None

    def with_overrides(self, **changes: Any) -> Scenario:
        """A copy with some top-level fields replaced (command-line overrides, tests)."""
        out = dataclasses.replace(self, **changes)
        _validate(out)
        return out


# ------------------------------------------------------------------------- loading


def resolve(name_or_path: str) -> Path:
    """A path as given, or the name of a standard scenario (with or without ``.toml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name.removesuffix(".toml")
    q = SCENARIO_DIR / f"{stem}.toml"
    if q.is_file():
        return q
    known = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.toml")))
    raise ScenarioError(f"no scenario {name_or_path!r} (known: {known})")


def load(name_or_path: str) -> Scenario:
    path = resolve(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return parse(data, default_name=path.stem, where=str(path))


def parse(data: Mapping[str, Any], default_name: str = "scenario", where: str = "") -> Scenario:
    """Build a :class:`Scenario` from a TOML document (already parsed)."""
    where = where or default_name
    top = dict(data)
    network = _table(top.pop("network", {}), "network", where)
    boot = _table(top.pop("bootstrap", {}), "bootstrap", where)
    run = _table(top.pop("run", {}), "run", where)
    kw: dict[str, Any] = {"name": top.pop("name", default_name)}
    for key in ("nodes", "duration", "description", "seed", "profile"):
        if key in top:
            kw[key] = top.pop(key)
    kw["timing"] = _table(top.pop("timing", {}), "timing", where)
    if "latency" in network:
        kw["latency"] = _build(Latency, network.pop("latency"), "network.latency", where)
    if "loss" in network:
        kw["loss"] = network.pop("loss")
    _no_extra(network, "network", where)
    for src, dst in (("mode", "bootstrap"), ("seeds", "seeds"), ("join_window", "join_window")):
        if src in boot:
            kw[dst] = boot.pop(src)
    _no_extra(boot, "bootstrap", where)
    kw["crashes"] = tuple(_build(Crash, c, "crash", where) for c in top.pop("crash", []))
    kw["partitions"] = tuple(
        _build(Partition, p, "partition", where) for p in top.pop("partition", [])
    )
    kw["broadcasts"] = tuple(
        _build(Broadcast, b, "broadcast", where) for b in top.pop("broadcast", [])
    )
    if "slow" in top:
        kw["slow"] = _build(Slow, top.pop("slow"), "slow", where)
    for key in (
        "compare_lifeguard",
        "wire",
        "bytes_sample",
        "sample_interval",
        "max_events",
    ):
        if key in run:
            kw[key] = run.pop(key)
    _no_extra(run, "run", where)
    _no_extra(top, "top level", where)
    try:
        scenario = Scenario(**kw)
    except TypeError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    _validate(scenario, where)
    return scenario


def _table(obj: Any, name: str, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ScenarioError(f"{where}: [{name}] must be a table")
    return dict(obj)


def _no_extra(d: Mapping[str, Any], name: str, where: str) -> None:
    if d:
        raise ScenarioError(f"{where}: unknown key(s) in {name}: {', '.join(sorted(d))}")


def _build(cls: type[Any], obj: Any, name: str, where: str) -> Any:
    d = _table(obj, name, where)
    names = {f.name for f in dataclasses.fields(cls)}
    _no_extra({k: v for k, v in d.items() if k not in names}, name, where)
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = tuple(v)
    try:
        return cls(**d)
    except TypeError as exc:
        raise ScenarioError(f"{where}: [{name}]: {exc}") from None


def _validate(s: Scenario, where: str = "") -> None:
    """Reject values the engine cannot run meaningfully, before any work is done."""
    where = where or s.name

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ScenarioError(f"{where}: {what}")

    need(isinstance(s.nodes, int) and s.nodes >= 2, "nodes must be an integer >= 2")
    need(s.nodes <= 0xFFFFFF, "nodes must fit in a 10.x.y.z address plan (< 16,777,216)")
    need(s.duration > 0, "duration must be positive")
    need(s.profile in PROFILES, f"profile must be one of {sorted(PROFILES)}")
    need(s.bootstrap in ("full", "seeds"), "bootstrap.mode must be 'full' or 'seeds'")
    need(1 <= s.seeds <= s.nodes, "bootstrap.seeds must be between 1 and nodes")
    need(s.join_window >= 0, "bootstrap.join_window must not be negative")
    need(0 <= s.loss < 1, "network.loss must be in [0, 1)")
    lat = s.latency
    need(lat.dist in ("uniform", "lognormal"), "latency.dist must be 'uniform' or 'lognormal'")
    need(0 <= lat.min <= lat.max, "latency needs 0 <= min <= max")
    need(lat.median > 0 and lat.sigma >= 0, "latency needs median > 0 and sigma >= 0")
    need(s.bytes_sample >= 1, "run.bytes_sample must be >= 1")
    need(s.sample_interval > 0, "run.sample_interval must be positive")
    need(s.max_events > 0, "run.max_events must be positive")
    for c in s.crashes:
        need(c.node is None or 0 <= c.node < s.nodes, f"crash node {c.node} out of range")
        need(c.restart_at is None or c.restart_at > c.at, "crash restart_at must follow at")
    for p in s.partitions:
        need(0 <= p.start < p.end, "partition needs 0 <= start < end")
        need(0 < p.fraction < 1, "partition fraction must be in (0, 1)")
        need(all(0 <= i < s.nodes for i in p.nodes), "partition node out of range")
    sl = s.slow
    need(0 <= sl.count <= s.nodes, "slow.count out of range")
    need(0 <= sl.delay_min <= sl.delay_max, "slow needs 0 <= delay_min <= delay_max")
    need(all(0 <= i < s.nodes for i in sl.nodes), "slow node out of range")
    for b in s.broadcasts:
        need(b.count >= 1 and b.every > 0, "broadcast needs count >= 1 and every > 0")
        need(b.node is None or 0 <= b.node < s.nodes, f"broadcast node {b.node} out of range")
        need(isinstance(b.group, str), "broadcast group must be a string")
    s.build_timing()  # raises on a bad [timing] key or value
