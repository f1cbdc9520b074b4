"""Run simulation scenarios from the command line.

    python -m simulations.run crash_1000 [--seed N] [--out DIR] [--wire] [--lifeguard on|off]
    python -m simulations.run --all

Prints a summary, writes ``<out>/<scenario>[-seed<N>].json`` (default
``simulations/results/``, git-ignored) and, when matplotlib is importable, a PNG
next to it. A scenario with ``compare_lifeguard = true`` runs twice (Lifeguard on,
then off) and reports the ratio of false positives, unless ``--lifeguard`` picks one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from simulations import metrics, scenario
from simulations.engine import Simulation
from simulations.scenario import Scenario, ScenarioError

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_one(
    sc: Scenario,
    *,
    seed: int | None = None,
    lifeguard: bool | None = None,
    wire: bool | None = None,
) -> dict[str, Any]:
    """One simulation, its metrics as a JSON-ready dict."""
    sim = Simulation(sc, seed=seed, lifeguard=lifeguard, wire_mode=wire).run()
    return metrics.collect(sim)


def run_scenario(
    sc: Scenario,
    *,
    seed: int | None = None,
    lifeguard: bool | None = None,
    wire: bool | None = None,
) -> dict[str, Any]:
    """A scenario as its file asks: one run, or a Lifeguard on/off pair."""
    if sc.compare_lifeguard and lifeguard is None:
        on = run_one(sc, seed=seed, lifeguard=True, wire=wire)
        off = run_one(sc, seed=seed, lifeguard=False, wire=wire)
        return {
            "scenario": sc.name,
            "runs": {"lifeguard_on": on, "lifeguard_off": off},
            "comparison": compare(on, off),
        }
    out = run_one(sc, seed=seed, lifeguard=lifeguard, wire=wire)
    return {"scenario": sc.name, "runs": {label(out): out}}


def label(run: dict[str, Any]) -> str:
    return "lifeguard_on" if run["result"]["formulas"]["lifeguard"] else "lifeguard_off"


def compare(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """False positives without Lifeguard divided by those with it (None when 0/0)."""
    out: dict[str, Any] = {}
    for kind in ("dead", "suspect"):
        a = on["result"]["false_positives"][kind]["events"]
        b = off["result"]["false_positives"][kind]["events"]
        out[f"{kind}_on"] = a
        out[f"{kind}_off"] = b
        out[f"{kind}_ratio_off_over_on"] = None if a == 0 else round(b / a, 3)
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
            f"wall={w['total_s']:.1f}s (setup {w['setup_s']:.2f}s, "
            f"{w['add_member_calls']} add_member, {w['us_per_add_member']} us each) "
            f"events={r['events']}"
        )
        f = r["formulas"]
        lines.append(
            f"    suspicion min/max={f['suspicion_min_s']}/{f['suspicion_max_s']}s "
            f"K={f['expected_confirmations']} retransmit={f['retransmit_limit']}"
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
        ds = r["dissemination"]["summary"]
        if ds["items"]:
            lines.append(
                f"    dissemination of {ds['items']} items: median t50 {ds['t50_s']['median']}s "
                f"t90 {ds['t90_s']['median']}s t99 {ds['t99_s']['median']}s "
                f"t100 {ds['t100_s']['median']}s (max t100 {ds['t100_s']['max']}s, "
                f"{ds['t100_s']['missing']} incomplete), min coverage {ds['coverage_min']}"
            )
        lines.append(
            f"    traffic: {tr['msgs_per_node_s']} msgs and {tr['bytes_per_node_s']} bytes "
            f"per node per second (bytes {tr['bytes_counted']}); "
            f"busiest node {tr['max_node_msgs_per_s']} msgs/s; "
            f"anti-entropy {tr['anti_entropy']['exchanges']} exchanges"
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
            f"(ratio {c['dead_ratio_off_over_on']}), SUSPECT {c['suspect_off']}/{c['suspect_on']} "
            f"(ratio {c['suspect_ratio_off_over_on']})"
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
    args = ap.parse_args(argv)
    if args.all == (args.scenario is not None):
        ap.error("give one scenario or --all")
    names = list(scenario.STANDARD) if args.all else [args.scenario]
    lifeguard = None if args.lifeguard is None else args.lifeguard == "on"
    from simulations import plot  # late: it probes for matplotlib

    t0 = time.perf_counter()
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
        doc = run_scenario(sc, seed=args.seed, lifeguard=lifeguard, wire=args.wire or None)
        stem = sc.name if args.seed is None else f"{sc.name}-seed{args.seed}"
        path = write(doc, args.out, stem)
        print(summary(doc))
        print(f"  -> {path}")
        png = plot.plot(doc, args.out / f"{stem}.png")
        print(f"  -> {png}" if png else f"  (no PNG: {plot.MISSING})")
        sys.stdout.flush()
    if args.all:
        print(f"all done in {time.perf_counter() - t0:.1f}s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
