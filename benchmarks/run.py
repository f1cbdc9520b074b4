"""Run the benchmarks, print a summary, and write ``benchmarks/results/<name>.json``.

``python -m benchmarks.run`` (``make bench``) runs all of them; ``--only NAME`` picks
some, ``--quick`` does fewer repetitions. Each results file carries the machine
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

from benchmarks import join_rtt, records
from benchmarks.common import RESULTS_DIR, load_average, machine_info, timestamp, write_json

Runner = Callable[[bool], dict[str, Any]]
Formatter = Callable[[dict[str, Any]], str]

BENCHMARKS: dict[str, tuple[Runner, Formatter]] = {
    records.NAME: (records.run, records.format_summary),
    join_rtt.NAME: (join_rtt.run, join_rtt.format_summary),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="meshd benchmarks (numbers, not tests)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        help="run only this benchmark (repeatable; default: all)",
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
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
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
