"""Run the benchmarks, print a summary, and write ``benchmarks/results/<name>.json``.

``python -m benchmarks.run`` (``make bench``) runs all of them but the opt-in ones;
``--only NAME`` picks some (opt-in ones included), ``--quick`` does fewer repetitions.
``vs_serf`` (meshd next to HashiCorp Serf, 15 to 25 minutes in full, one N=30 run with
``--quick``) is opt-in: ``--only vs_serf``. Each results file carries the machine
(CPU count and model, Python, platform), the time of the run and the mode, so
figures from different runs and machines can be told apart. Numbers only: nothing
here passes or fails.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import dns, join_rtt, records, vs_serf
from benchmarks.common import RESULTS_DIR, load_average, machine_info, timestamp, write_json

Runner = Callable[[bool], dict[str, Any]]
Formatter = Callable[[dict[str, Any]], str]

BENCHMARKS: dict[str, tuple[Runner, Formatter]] = {
    records.NAME: (records.run, records.format_summary),
    join_rtt.NAME: (join_rtt.run, join_rtt.format_summary),
    vs_serf.NAME: (vs_serf.run, vs_serf.format_summary),
    dns.NAME: (dns.run, dns.format_summary),
}
#: Run only when named with --only: too long (or needing more than meshd) for every run.
OPT_IN: frozenset[str] = frozenset({vs_serf.NAME})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="meshd benchmarks (numbers, not tests)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        help=f"run only this benchmark (repeatable; default: all but {', '.join(sorted(OPT_IN))})",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, less precise")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where to write <name>.json (default {RESULTS_DIR})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n for n in BENCHMARKS if (n in args.only if args.only else n not in OPT_IN)]
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
