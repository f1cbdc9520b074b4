"""Run simulation scenarios from the command line.

    python -m simulations.run crash_1000 [--seed N] [--out DIR] [--wire] [--lifeguard on|off]
    python -m simulations.run crash_1000 --profile    # where the CPU time goes
    python -m simulations.run --all

Prints a summary, writes ``<out>/<scenario>[-seed<N>].json`` (default
``simulations/results/``, git-ignored) and, when matplotlib is importable, a PNG
next to it. A scenario with ``compare_lifeguard = true`` runs twice (Lifeguard on,
then off) and reports the ratio of false positives, unless ``--lifeguard`` picks one.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from simulations import metrics, scenario
from simulations.engine import Simulation
from simulations.scenario import Scenario, ScenarioError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Memory per view entry (one member in one core's view: the core's dict, bag and
#: probe-order entries, the simulator's byte; the member objects are shared), measured
#: at 10,000 nodes: 78 bytes (7.8 GB peak RSS).
BYTES_PER_VIEW_ENTRY = 85


def memory_needed(sc: Scenario) -> int:
    """Bytes a run of ``sc`` needs, about: every core ends up holding every member."""
    return BYTES_PER_VIEW_ENTRY * sc.nodes * sc.nodes + 300 * 2**20


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


T = TypeVar("T")


def profiled(fn: Callable[[], T], out: Path) -> T:
    """Run ``fn`` under pyinstrument (sampling, little overhead, fit for 10,000 nodes)
    when it is importable, else under cProfile (exact counts, several times slower);
    write the report to ``out``. Neither is a dependency of meshd."""
    try:
        from pyinstrument import Profiler  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        Profiler = None
    if Profiler is not None:
        prof = Profiler(interval=0.005)
        prof.start()
        try:
            result = fn()
        finally:
            prof.stop()
        text = prof.output_text(unicode=False, color=False)
    else:
        pr = cProfile.Profile()
        pr.enable()
        try:
            result = fn()
        finally:
            pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(40)
        text = buf.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"  profile -> {out}")
    return result


def run_one(
    sc: Scenario,
    *,
    seed: int | None = None,
    lifeguard: bool | None = None,
    wire: bool | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One simulation, its metrics as a JSON-ready dict (``profile``: a report path)."""
    sim = Simulation(sc, seed=seed, lifeguard=lifeguard, wire_mode=wire)
    if profile is None:
        sim.run()
    else:
        profiled(sim.run, profile)
    return metrics.collect(sim)


def run_scenario(
    sc: Scenario,
    *,
    seed: int | None = None,
    lifeguard: bool | None = None,
    wire: bool | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """A scenario as its file asks: one run, or a Lifeguard on/off pair."""
    if sc.compare_lifeguard and lifeguard is None:
        p_on = p_off = None
        if profile is not None:
            p_on = profile.with_name(profile.stem + "-lifeguard_on.txt")
            p_off = profile.with_name(profile.stem + "-lifeguard_off.txt")
        on = run_one(sc, seed=seed, lifeguard=True, wire=wire, profile=p_on)
        off = run_one(sc, seed=seed, lifeguard=False, wire=wire, profile=p_off)
        return {
            "scenario": sc.name,
            "runs": {"lifeguard_on": on, "lifeguard_off": off},
            "comparison": compare(on, off),
        }
    out = run_one(sc, seed=seed, lifeguard=lifeguard, wire=wire, profile=profile)
    return {"scenario": sc.name, "runs": {label(out): out}}


def label(run: dict[str, Any]) -> str:
    return "lifeguard_on" if run["result"]["formulas"]["lifeguard"] else "lifeguard_off"


def compare(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """False positives without Lifeguard divided by those with it (None when 0 with it),
    all of them and only those about healthy nodes (the slow ones are really slow)."""
    out: dict[str, Any] = {}
    for kind in ("dead", "suspect"):
        for key, suffix in (("events", ""), ("about_healthy_nodes", "_healthy")):
            a = on["result"]["false_positives"][kind][key]
            b = off["result"]["false_positives"][kind][key]
            name = f"{kind}{suffix}"
            out[f"{name}_on"] = a
            out[f"{name}_off"] = b
            out[f"{name}_ratio_off_over_on"] = None if a == 0 else round(b / a, 3)
            # With none at all under Lifeguard the ratio is unbounded: at least off / 1.
            out[f"{name}_ratio_at_least"] = round(b / max(a, 1), 3)
    return out


# ------------------------------------------------------------------------ output


def summary(doc: dict[str, Any]) -> str:
    """A few lines per run: what a human compares between runs."""
    lines = [f"== {doc['scenario']}"]
    for name, run in doc["runs"].items():
        r, w = run["result"], run["wall"]
        tr = r["traffic"]
        fp = r["false_positives"]
        lines.append(
            f"  [{name}] nodes={r['nodes']} seed={r['seed']} simulated={r['simulated_s']:.0f}s "
            f"wall={w['total_s']:.1f}s cpu={w['cpu_s']:.1f}s (setup {w['setup_s']:.2f}s, "
            f"cpu {w['setup_cpu_s']:.2f}s, "
            f"{w['add_member_calls']} add_member, {w['us_per_add_member']} us each) "
            f"events={r['events']}"
        )
        f = r["formulas"]
        lines.append(
            f"    suspicion min/max={f['suspicion_min_s']}/{f['suspicion_max_s']}s "
            f"K={f['expected_confirmations']} floor={f['suspicion_floor_s']}s after "
            f"{f['floor_confirmations']} retransmit={f['retransmit_limit']} "
            f"push-pull every {f['push_pull_interval_scaled_s']}s per node"
        )
        for c in r["crashes"]:
            d = c["dead_s"]
            lines.append(
                f"    crash node {c['node']} at {c['at']}s: DEAD at {c['fraction']:.1%} of "
                f"{c['observers']} nodes; median {d['median']}s p99 {d['p99']}s max {d['max']}s "
                f"(first suspicion after {c['first_suspect_s']}s)"
            )
        lines.append(
            f"    false positives: DEAD {fp['dead']['events']} "
            f"({fp['dead']['outside_partitions']} outside partitions, "
            f"{fp['dead']['distinct_subjects']} nodes), SUSPECT {fp['suspect']['events']} "
            f"({fp['suspect']['outside_partitions']} outside partitions), "
            f"refutations {fp['refutations']}"
        )
        for group, ds in r["dissemination"]["groups"].items():
            lines.append(
                f"    dissemination of {ds['items']} items ({group}): "
                f"median t50 {ds['t50_s']['median']}s "
                f"t90 {ds['t90_s']['median']}s t99 {ds['t99_s']['median']}s "
                f"t99.99 {ds['t99.99_s']['median']}s (max {ds['t99.99_s']['max']}s) "
                f"t100 {ds['t100_s']['median']}s (max t100 {ds['t100_s']['max']}s, "
                f"{ds['t100_s']['missing']} incomplete), min coverage {ds['coverage_min']}"
            )
        lines.append(
            f"    traffic: {tr['msgs_per_node_s']} msgs and {tr['bytes_per_node_s']} bytes "
            f"per node per second (bytes {tr['bytes_counted']}); "
            f"busiest node {tr['max_node_msgs_per_s']} msgs/s; "
            f"record pull: {tr['record_pull']['rq']} requests, "
            f"{tr['record_pull']['new']} new and {tr['record_pull']['stale']} stale records"
        )
        by_kind = ", ".join(f"{k} {v}" for k, v in tr["bytes_per_node_s_by_kind"].items())
        lines.append(
            f"    bytes/node/s by kind: {by_kind}; peak 1-sample mean "
            f"{tr['peak_mean_bytes_per_node_s']} B/s, busiest node in its busiest sample "
            f"{tr['peak_node_bytes_per_s']} B/s "
            f"(memberlist gossip budget {tr['memberlist_gossip_budget_bytes_per_s']:.0f} B/s)"
        )
        for wa in r["convergence"]["watches"]:
            lines.append(
                f"    views complete after {wa['label']} at {wa['since']}s: "
                f"{wa['complete_after_s']} s"
            )
        cv = r["convergence"]
        lines.append(
            f"    at the end: {cv['final_incomplete_nodes']} nodes with an incomplete view "
            f"({cv['final_wrong_pairs']} wrong entries)"
        )
    if "comparison" in doc:
        c = doc["comparison"]
        lines.append(
            f"  lifeguard off/on: DEAD {c['dead_off']}/{c['dead_on']} "
            f"(ratio {c['dead_ratio_off_over_on']}, at least {c['dead_ratio_at_least']}), "
            f"SUSPECT {c['suspect_off']}/{c['suspect_on']} "
            f"(ratio {c['suspect_ratio_off_over_on']}); about healthy nodes only: "
            f"DEAD {c['dead_healthy_off']}/{c['dead_healthy_on']} "
            f"(at least {c['dead_healthy_ratio_at_least']}), "
            f"SUSPECT {c['suspect_healthy_off']}/{c['suspect_healthy_on']} "
            f"(ratio {c['suspect_healthy_ratio_off_over_on']})"
        )
    return "\n".join(lines)


def write(doc: dict[str, Any], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.run", description=__doc__)
    ap.add_argument("scenario", nargs="?", help="a scenario name or a .toml path")
    ap.add_argument("--all", action="store_true", help="run the standard set")
    ap.add_argument("--seed", type=int, help="override the scenario's seed")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    ap.add_argument("--wire", action="store_true", help="pack/unpack every message")
    ap.add_argument("--lifeguard", choices=("on", "off"), help="run only this variant")
    ap.add_argument("--nodes", type=int, help="override the cluster size")
    ap.add_argument("--duration", type=float, help="override the simulated seconds")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="profile the run (pyinstrument if installed, else cProfile): <stem>.profile.txt",
    )
    ap.add_argument(
        "--no-memory-check",
        action="store_true",
        help="run even when the scenario looks too big for the free memory",
    )
    args = ap.parse_args(argv)
    if args.all == (args.scenario is not None):
        ap.error("give one scenario or --all")
    names = list(scenario.STANDARD) if args.all else [args.scenario]
    lifeguard = None if args.lifeguard is None else args.lifeguard == "on"
    from simulations import plot  # late: it probes for matplotlib

    t0 = time.perf_counter()
    skipped: list[str] = []
    for name in names:
        try:
            sc = scenario.load(name)
            changes: dict[str, Any] = {}
            if args.nodes is not None:
                changes["nodes"] = args.nodes
            if args.duration is not None:
                changes["duration"] = args.duration
            if changes:
                sc = sc.with_overrides(**changes)
        except ScenarioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        need, avail = memory_needed(sc), memory_available()
        if avail is not None and need > avail and not args.no_memory_check:
            print(
                f"== {sc.name}: skipped, needs about {need / 2**30:.1f} GiB of memory and "
                f"{avail / 2**30:.1f} GiB are available (--no-memory-check runs it anyway)",
                file=sys.stderr,
            )
            skipped.append(sc.name)
            continue
        stem = sc.name if args.seed is None else f"{sc.name}-seed{args.seed}"
        doc = run_scenario(
            sc,
            seed=args.seed,
            lifeguard=lifeguard,
            wire=args.wire or None,
            profile=args.out / f"{stem}.profile.txt" if args.profile else None,
        )
        path = write(doc, args.out, stem)
        print(summary(doc))
        print(f"  -> {path}")
        png = plot.plot(doc, args.out / f"{stem}.png")
        print(f"  -> {png}" if png else f"  (no PNG: {plot.MISSING})")
        sys.stdout.flush()
    if args.all:
        print(f"all done in {time.perf_counter() - t0:.1f}s wall")
    if skipped:
        print(f"skipped for lack of memory: {', '.join(skipped)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
