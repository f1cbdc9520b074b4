"""Run the benchmarks, print a summary, and write ``benchmarks/results/<name>.json``.

``python -m benchmarks.run`` (``make bench``) runs all of them but the opt-in ones;
``--only NAME`` picks some (opt-in ones included), ``--quick`` does fewer repetitions.
``vs_serf`` (meshd next to HashiCorp Serf, 15 to 25 minutes in full, one N=30 run with
``--quick``) is opt-in: ``--only vs_serf``. So are the WireGuard ones, which need
root: ``wg_mesh`` (10 agents in network namespaces to every pair pinging),
``wg_iperf`` (iperf3 over meshd's overlay and over a hand-configured one) and
``agent_idle`` (CPU and memory of idle agents); ``--only wg`` (``make bench-wg``)
runs the three. Each results file carries the machine (CPU count and model, Python,
platform), the time of the run and the mode, so figures from different runs and
machines can be told apart. Numbers only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import agent_idle, dns, join_rtt, records, vs_serf, wg_iperf, wg_mesh
from benchmarks.common import RESULTS_DIR, load_average, machine_info, timestamp, write_json

Runner = Callable[[bool], dict[str, Any]]
Formatter = Callable[[dict[str, Any]], str]

BENCHMARKS: dict[str, tuple[Runner, Formatter]] = {
    records.NAME: (records.run, records.format_summary),
    join_rtt.NAME: (join_rtt.run, join_rtt.format_summary),
    vs_serf.NAME: (vs_serf.run, vs_serf.format_summary),
    dns.NAME: (dns.run, dns.format_summary),
    wg_mesh.NAME: (wg_mesh.run, wg_mesh.format_summary),
    wg_iperf.NAME: (wg_iperf.run, wg_iperf.format_summary),
    agent_idle.NAME: (agent_idle.run, agent_idle.format_summary),
}
#: Run only when named with --only: too long (or needing more than meshd) for every run.
#: The WireGuard ones need root (network namespaces) and take 3 to 8 minutes each.
OPT_IN: frozenset[str] = frozenset({vs_serf.NAME, wg_mesh.NAME, wg_iperf.NAME, agent_idle.NAME})
#: ``--only wg`` runs these (``make bench-wg``).
GROUPS: dict[str, tuple[str, ...]] = {"wg": (wg_mesh.NAME, wg_iperf.NAME, agent_idle.NAME)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="meshd benchmarks (numbers, not tests)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted([*BENCHMARKS, *GROUPS]),
        help=f"run only this benchmark or group {sorted(GROUPS)} (repeatable; "
        f"default: all but {', '.join(sorted(OPT_IN))})",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, less precise")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where to write <name>.json (default {RESULTS_DIR})",
    )
    return parser


def selected(only: Sequence[str] | None) -> list[str]:
    """The benchmarks ``--only`` names (groups expanded), in registry order; all but the
    opt-in ones without it."""
    wanted = {n for o in only or () for n in GROUPS.get(o, (o,))}
    return [n for n in BENCHMARKS if (n in wanted if wanted else n not in OPT_IN)]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = selected(args.only)
    machine = machine_info()
    print(
        f"meshd benchmarks ({'quick' if args.quick else 'full'}): {machine['cpu_count']} CPUs "
        f"({machine.get('cpu_model') or 'unknown model'}), Python {machine['python']}, "
        f"{machine['platform']}"
    )
    failed: list[str] = []
    for name in names:
        run, fmt = BENCHMARKS[name]
        started = timestamp()
        load_before = load_average()
        t0 = time.monotonic()
        try:
            result = run(args.quick)
        except Exception as exc:  # one broken benchmark must not cost the others' figures
            print(f"\n{name}: could not run: {type(exc).__name__}: {exc}")
            failed.append(name)
            continue
        result.update(
            timestamp=started,
            duration_s=round(time.monotonic() - t0, 1),
            machine=machine,
            load_average={"before": load_before, "after": load_average()},
        )
        path = write_json(name, result, args.results_dir)
        print()
        print(fmt(result))
        load = result["load_average"]["after"]
        print(f"  ({result['duration_s']} s, load average after {load}; written to {path})")
    if failed:
        print(f"\nnot measured: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
