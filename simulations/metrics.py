"""Turn a finished :class:`~simulations.engine.Simulation` into plain, comparable numbers.

Everything under ``"result"`` is a pure function of the scenario and the seed (the
determinism test compares it); wall-clock figures live apart under ``"wall"``.
Percentiles are nearest-rank (the smallest sample with at least q of the samples at
or below it), so p99 of 999 detections is an actual detection time, not an
interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from meshd.core.membership import (
    expected_confirmations,
    push_pull_scale,
    retransmit_limit,
    suspicion_bounds,
    suspicion_floor,
)
from meshd.core.pull import RECORD_WANT_RETRY
from simulations.engine import BroadcastRecord, CrashRecord, Simulation

#: Dissemination is reported at these fractions of the nodes live at injection.
REACH: tuple[float, ...] = (0.5, 0.9, 0.99, 0.9999, 1.0)
#: memberlist's gossip budget per node: ``UDPBufferSize`` (1,400 B) x ``GossipNodes`` (3)
#: every ``GossipInterval`` (200 ms) = 21,000 B/s, probes not included. The LAN profile's
#: gossip settings are memberlist's, so this is the figure to compare against.
MEMBERLIST_PACKET: int = 1_400


def reach_key(q: float) -> str:
    """``t50_s``, ``t99_s``, ``t99.99_s``, ``t100_s``: seconds to reach a fraction q."""
    return f"t{q * 100:g}_s"


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence."""
    if not ordered:
        return None
    k = max(1, math.ceil(q * len(ordered)))
    return ordered[min(k, len(ordered)) - 1]


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def stats(samples: Sequence[float]) -> dict[str, Any]:
    """Count, median, p99 and max of ``samples`` (seconds, rounded to the millisecond)."""
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median": _r(percentile(ordered, 0.5)),
        "p99": _r(percentile(ordered, 0.99)),
        "max": _r(ordered[-1] if ordered else None),
    }


def formulas(sim: Simulation) -> dict[str, Any]:
    """The core's own bounds for this cluster size, to read the measurements against."""
    t, n = sim.timing, sim.n
    low, high = suspicion_bounds(t, n)
    floor, k_floor = suspicion_floor(t, n)
    return {
        "suspicion_min_s": round(low, 3),
        "suspicion_max_s": round(high, 3),
        "expected_confirmations": expected_confirmations(t, n),
        # Below memberlist's minimum after k_floor confirmations (0: not at this size).
        "suspicion_floor_s": round(floor, 3),
        "floor_confirmations": k_floor,
        "retransmit_limit": retransmit_limit(t.retransmit_mult, n),
        "probe_interval_s": t.probe_interval,
        "probe_timeout_s": t.probe_timeout,
        "gossip_interval_s": t.gossip_interval,
        "push_pull_interval_s": t.push_pull_interval,
        # What each node actually waits between push-pulls at this size (pushPullScale).
        "push_pull_interval_scaled_s": push_pull_scale(t.push_pull_interval, n),
        "record_pull_retry_s": RECORD_WANT_RETRY,
        "max_packet": t.max_packet,
        "lifeguard": t.lifeguard,
    }


def detection(sim: Simulation, rec: CrashRecord) -> dict[str, Any]:
    """How long each node took to mark the crashed node DEAD.

    Observers are the nodes running at the crash that stayed up until the victim
    restarted (or the run ended); ``fraction`` is the share of them that did.
    """
    window_end = rec.restart_at if rec.restart_at is not None else sim.end
    later = {c.node for c in sim.crashes if rec.at < c.at <= window_end}
    observers = [i for i in rec.observers if i not in later]
    latencies = [rec.dead_at[i] - rec.at for i in observers if i in rec.dead_at]
    return {
        "node": rec.node,
        "at": round(rec.at, 3),
        "restart_at": _r(rec.restart_at),
        "observers": len(observers),
        "fraction": round(len(latencies) / len(observers), 4) if observers else None,
        "first_suspect_s": _r(None if rec.first_suspect is None else rec.first_suspect - rec.at),
        "dead_s": stats(latencies),
    }


def false_positives(sim: Simulation) -> dict[str, Any]:
    """Accusations of running nodes, split by kind and by what could explain them."""
    out: dict[str, Any] = {}
    for kind in ("dead", "suspect"):
        rows = [(k, v) for k, v in sim.fp_counts.items() if k[0] == kind]
        out[kind] = {
            "events": sum(v for _, v in rows),
            "outside_partitions": sum(v for k, v in rows if not k[1]),
            "distinct_subjects": len(sim.fp_subjects[kind]),
            "about_slow_nodes": sum(v for k, v in rows if k[2]),
            "about_healthy_nodes": sum(v for k, v in rows if not k[2]),
            "by_slow_nodes": sum(v for k, v in rows if k[3]),
        }
    out["refutations"] = sim.refutations
    out["first_events"] = [list(x) for x in sim.fp_first]
    return out


def reach(rec: BroadcastRecord) -> dict[str, Any]:
    """Time from injection until the item had reached each fraction of the observers."""
    times = sorted(rec.reached[i] - rec.at for i in rec.observers if i in rec.reached)
    total = len(rec.observers)
    out: dict[str, Any] = {
        "bid": rec.bid,
        "group": rec.group,
        "node": rec.node,
        "at": round(rec.at, 3),
        "observers": total,
        "coverage": round(len(times) / total, 4) if total else None,
    }
    for q in REACH:
        need = max(1, math.ceil(round(q * total, 9)))
        out[reach_key(q)] = _r(times[need - 1] if len(times) >= need else None)
    return out


def _reach_summary(per: list[dict[str, Any]]) -> dict[str, Any]:
    agg: dict[str, Any] = {"items": len(per)}
    for q in REACH:
        key = reach_key(q)
        vals = [p[key] for p in per if p[key] is not None]
        agg[key] = stats(vals) | {"missing": len(per) - len(vals)}
    agg["coverage_min"] = min((p["coverage"] for p in per), default=None)
    return agg


def dissemination(sim: Simulation) -> dict[str, Any]:
    """Per item, all items together, and per group (one ``[[broadcast]]`` table each)."""
    per = [reach(r) for r in sim.broadcasts.values()]
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in per:
        groups.setdefault(p["group"], []).append(p)
    return {
        "summary": _reach_summary(per),
        "groups": {g: _reach_summary(items) for g, items in groups.items()},
        "per_item": per,
    }


def traffic(sim: Simulation) -> dict[str, Any]:
    """Messages and bytes per running node per second (node-seconds in the denominator,
    so crashed nodes do not dilute the rate)."""
    ns = sim.node_seconds or 1.0
    msgs, nbytes = sum(sim.msgs_sent), sum(sim.bytes_sent)
    up_time = sim.end
    sample = sim.scenario.bytes_sample
    counted = "exact" if sim.wire or sample == 1 else f"1 message in {sample}, scaled"
    # Per sample interval: the cluster's mean rate per live node and the busiest node's.
    mean_peak = node_peak = 0.0
    ts = sim.samples
    for a, b in pairwise(ts):
        dt = b["t"] - a["t"]
        if dt > 0:
            mean_peak = max(mean_peak, (b["bytes"] - a["bytes"]) / (max(b["live"], 1) * dt))
            node_peak = max(node_peak, b["max_node_bytes"] / dt)
    t = sim.timing
    budget = MEMBERLIST_PACKET * t.gossip_nodes / t.gossip_interval
    return {
        "messages": msgs,
        "bytes": nbytes,
        "node_seconds": round(ns, 3),
        "msgs_per_node_s": round(msgs / ns, 3),
        "bytes_per_node_s": round(nbytes / ns, 1),
        "max_node_msgs_per_s": round(max(sim.msgs_sent) / up_time, 3),
        "max_node_bytes_per_s": round(max(sim.bytes_sent) / up_time, 1),
        "peak_mean_bytes_per_node_s": round(mean_peak, 1),
        "peak_node_bytes_per_s": round(node_peak, 1),
        "memberlist_gossip_budget_bytes_per_s": round(budget, 1),
        "bytes_per_node_s_by_kind": {
            k: round(v / ns, 1) for k, v in sorted(sim.kind_bytes.items())
        },
        "by_kind": dict(sorted(sim.kinds.items())),
        "dropped": dict(sim.dropped),
        "oversize_packets": sim.oversize,
        "bytes_counted": counted,
        "record_pull": dict(sim.records),
    }


def convergence(sim: Simulation) -> dict[str, Any]:
    watches = [
        {
            "label": w.label,
            "since": round(w.since, 3),
            "complete_after_s": _r(None if w.done_at is None else w.done_at - w.since),
        }
        for w in sim.watches
    ]
    return {
        "watches": watches,
        "final_wrong_pairs": sim.wrong_total,
        "final_incomplete_nodes": sum(1 for w in sim.wrong if w),
    }


def result(sim: Simulation) -> dict[str, Any]:
    """Everything deterministic about a run."""
    s = sim.scenario
    return {
        "scenario": s.name,
        "seed": sim.seed,
        "nodes": sim.n,
        "simulated_s": sim.end,
        "wire": sim.wire,
        "formulas": formulas(sim),
        "events": sim.events_processed,
        "crashes": [detection(sim, r) for r in sim.crashes],
        "false_positives": false_positives(sim),
        "dissemination": dissemination(sim),
        "traffic": traffic(sim),
        "convergence": convergence(sim),
        "slow_nodes": sim.slow_nodes,
        "partitions": [len(side) for side in sim.partition_sides],
        "timeseries": sim.samples,
    }


def wall(sim: Simulation) -> dict[str, Any]:
    """Machine-dependent figures: never part of a determinism comparison."""
    setup = sim.setup
    return {
        "total_s": round(sim.wall_s, 3),
        "setup_s": None if setup is None else round(setup.wall_s, 3),
        "setup_cpu_s": None if setup is None else round(setup.cpu_s, 3),
        "setup_mode": None if setup is None else setup.mode,
        "add_member_calls": None if setup is None else setup.add_member_calls,
        "us_per_add_member": None
        if setup is None or setup.us_per_add_member is None
        else round(setup.us_per_add_member, 2),
        "cpu_s": round(sim.cpu_s, 3),
        "events_per_s": round(sim.events_processed / sim.wall_s) if sim.wall_s else None,
        "sim_speed": round(sim.end / sim.wall_s, 3) if sim.wall_s else None,
    }


def collect(sim: Simulation) -> dict[str, Any]:
    return {"result": result(sim), "wall": wall(sim)}
