"""meshd's DNS server next to dnsmasq on loopback, measured with dnsperf.

Both servers answer the same names: a zone of ``MEMBERS`` synthetic members (node
names, a hostname for every third, address-derived names, PTRs) built with
:mod:`meshd.core.naming`. meshd serves it with :class:`meshd.dns.DnsServer` (the code
the agent runs) in a process of its own; dnsmasq serves the same A/AAAA names from a
hosts file (``--addn-hosts``; it derives the PTRs itself) and answers NXDOMAIN for the
rest of the zone (``--local=/mesh.internal/``), with no upstream.

The query file mixes A (40 %), AAAA (40 %), PTR (10 %) of existing names and NXDOMAIN
(10 %), in a fixed shuffled order. For each server:

* **fixed rate**: dnsperf at ``RATE`` queries/s with ``-v``, so every answer's latency
  is known: p50, p90, p99, p99.9 and the maximum. The phase is cut into ``SLICES``
  slices per server, taken in turn (meshd, dnsmasq, meshd, ...) with both servers
  running, so that a noisy stretch of a shared machine (other guests, other work)
  falls on both servers alike rather than on whichever ran then;
* **throughput**: dnsperf with 100 queries outstanding and no rate limit for
  ``SECONDS``: completed queries/s and how many were lost.

Both servers are started fresh for a round (so the fixed-rate phase starts with a cold
cache, as after a zone change); ``--runs N`` repeats the rounds, alternating which
server goes first, and reports each figure as the median of the rounds. Nothing is
pinned to a CPU: dnsperf and the server share the machine's CPUs as a client and a
server on one host would.

Everything runs on 127.0.0.1 with ephemeral ports; every process started here is
stopped here. Needs the Debian packages dnsperf and dnsmasq-base (``make bench-deps``).

``python -m benchmarks.dns [--quick]`` runs it alone; ``run``/``format_summary`` have
the signatures ``benchmarks.run`` expects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from meshd.demo import free_port as demo_free_port

NAME: Final = "dns"
MEMBERS: Final = 200
RATE: Final = 5_000
#: The issue's latency goal at RATE (the summary counts the rounds that meet it).
P99_GOAL_MS: Final = 2.0
#: A round whose fixed-rate slices had less CPU time stolen by the hypervisor than this
#: (per cent, both servers) counts as quiet in the summary; an idle guest here loses ~1.5 %.
QUIET_STEAL_PCT: Final = 5.0
#: Fixed-rate slices per server and round, interleaved between the servers.
SLICES: Final = 5
ZONE: Final = "mesh.internal."


def build_zone(members: int) -> Any:
    from meshd.core.ipam import AddressPlan
    from meshd.core.membership import MemberState
    from meshd.core.naming import Member, ZoneView

    plan = AddressPlan.parse()
    entries = [
        (
            Member(
                node_id=i.to_bytes(16, "big"),
                name=f"m{i:04d}",
                hostname=f"svc{i:04d}.prod" if i % 3 == 0 else None,
                offset=i,
                admitted_at=float(i),
            ),
            MemberState.ALIVE,
        )
        for i in range(1, members + 1)
    ]
    return ZoneView.build(
        plan, ZONE, entries, (1).to_bytes(16, "big"), self_id=(1).to_bytes(16, "big")
    )


def serve(port: int, members: int) -> None:
    """The meshd side: one DnsServer on 127.0.0.1:port until SIGTERM (prints "ready")."""
    from meshd.dns import DnsServer

    async def main() -> None:
        server = DnsServer(build_zone(members), forward=False)
        await server.start([("127.0.0.1", port)])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await server.stop()

    asyncio.run(main())


def write_inputs(zone: Any, root: Path, queries: int, seed: int = 1) -> tuple[Path, Path]:
    """The hosts file for dnsmasq and the dnsperf query file, from the same zone."""
    by_addr: dict[str, list[str]] = {}
    a_names, aaaa_names, ptr_names = [], [], []
    for row in zone.rows():
        name = str(row["name"])
        if row["type"] == "PTR":
            ptr_names.append(name)
            continue
        by_addr.setdefault(str(row["address"]), []).append(name.rstrip("."))
        (a_names if row["type"] == "A" else aaaa_names).append(name)
    hosts = root / "hosts"
    hosts.write_text("".join(f"{a} {' '.join(ns)}\n" for a, ns in sorted(by_addr.items())))
    rnd = random.Random(seed)
    lines = []
    for _ in range(queries):
        r = rnd.random()
        if r < 0.4:
            lines.append(f"{rnd.choice(a_names)} A")
        elif r < 0.8:
            lines.append(f"{rnd.choice(aaaa_names)} AAAA")
        elif r < 0.9:
            lines.append(f"{rnd.choice(ptr_names)} PTR")
        else:
            lines.append(f"nx{rnd.randrange(10**6)}.{ZONE} A")
    data = root / "queries"
    data.write_text("\n".join(lines) + "\n")
    return hosts, data


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    return demo_free_port(socket.SOCK_DGRAM, also_tcp=True)


def wait_udp(port: int, timeout: float = 20.0) -> None:
    """Until the server answers a query for the zone apex."""
    query = bytes.fromhex("beef01000001000000000000") + b"\x04mesh\x08internal\x00\x00\x06\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(query, ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                if s.recv(4096)[:2] == b"\xbe\xef":
                    return
            time.sleep(0.05)
    raise RuntimeError(f"no DNS answer on 127.0.0.1:{port} within {timeout}s")


@contextlib.contextmanager
def process(argv: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def meshd_server(members: int, root: Path) -> Iterator[int]:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.dns", "--serve", str(port), "--members", str(members)]
    with process(argv, root / "meshd.log"):
        wait_udp(port)
        yield port


@contextlib.contextmanager
def dnsmasq_server(hosts: Path, root: Path) -> Iterator[int]:
    port = free_port()
    argv = [
        "dnsmasq", "--keep-in-foreground", "--no-daemon", f"--port={port}",
        "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
        f"--addn-hosts={hosts}", f"--local=/{ZONE.rstrip('.')}/", "--no-negcache",
        "--pid-file=", "--user=root", "--cache-size=10000", "--local-ttl=5",
    ]  # fmt: skip
    with process(argv, root / "dnsmasq.log"):
        wait_udp(port)
        yield port


_SUMMARY = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "avg_latency_s": re.compile(r"Average Latency \(s\):\s+([\d.]+)"),
}
_VERBOSE = re.compile(r"^> (\w+) .* ([\d.]+)$")


def dnsperf(port: int, data: Path, seconds: float, rate: int | None) -> dict[str, Any]:
    """One dnsperf run: its summary figures, and with a ``rate`` every answer's rcode
    and latency (``latencies``, ms, in order)."""
    argv = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(data), "-l", str(seconds),
            "-q", "100", "-t", "2"]  # fmt: skip
    if rate is not None:
        argv += ["-Q", str(rate), "-v"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out: dict[str, Any] = {}
    for key, rx in _SUMMARY.items():
        m = rx.search(res.stdout)
        out[key] = float(m.group(1)) if m else None
    if rate is not None:
        lat: list[float] = []
        rcodes: dict[str, int] = {}
        for line in res.stdout.splitlines():
            m = _VERBOSE.match(line)
            if m:
                rcodes[m.group(1)] = rcodes.get(m.group(1), 0) + 1
                lat.append(float(m.group(2)) * 1000)
        out["rcodes"] = rcodes
        out["latencies"] = lat
    if res.returncode != 0:
        out["error"] = res.stderr.strip()[-500:]
    return out


def cpu_ticks() -> tuple[int, int]:
    """(steal, all) clock ticks of the machine so far, from /proc/stat (0, 0 elsewhere):
    time the hypervisor gave this guest's vCPUs to someone else, which no server here
    can do anything about and which shows in every tail."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def fixed_rate(ports: dict[str, int], data: Path, seconds: float) -> dict[str, dict[str, Any]]:
    """Each server at :data:`RATE` for ``seconds`` in all, in :data:`SLICES` slices
    taken in turn in the order of ``ports``; per server the summed counts, the
    percentiles of all its answers, and the share of CPU time stolen while it ran."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in ports}
    ticks = {label: [0, 0] for label in ports}
    for _ in range(SLICES):
        for label, port in ports.items():
            steal0, all0 = cpu_ticks()
            runs[label].append(dnsperf(port, data, seconds / SLICES, RATE))
            steal1, all1 = cpu_ticks()
            ticks[label][0] += steal1 - steal0
            ticks[label][1] += all1 - all0
    out: dict[str, dict[str, Any]] = {}
    for label, slices in runs.items():
        merged: dict[str, Any] = {
            k: sum(r[k] for r in slices) if all(r.get(k) is not None for r in slices) else None
            for k in ("sent", "completed", "lost")
        }
        rcodes: dict[str, int] = {}
        for r in slices:
            for code, n in r["rcodes"].items():
                rcodes[code] = rcodes.get(code, 0) + n
        merged["rcodes"] = rcodes
        merged["latency_ms"] = percentiles([ms for r in slices for ms in r["latencies"]])
        merged["slice_p99_ms"] = [percentiles(r["latencies"]).get("p99") for r in slices]
        stolen, total = ticks[label]
        merged["steal_pct"] = round(100 * stolen / total, 1) if total else None
        errors = [r["error"] for r in slices if "error" in r]
        if errors:
            merged["error"] = errors[-1]
        out[label] = merged
    return out


def percentiles(ms: list[float]) -> dict[str, float | int | None]:
    if not ms:
        return {"n": 0}
    ordered = sorted(ms)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {
        "n": len(ordered),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "p99_9": pct(99.9),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def run(quick: bool, runs: int = 1) -> dict[str, Any]:
    """``runs`` rounds of both servers, alternating which goes first; each server's
    figures are the medians over the rounds (the machine's noise is large)."""
    missing = [p for p in ("dnsperf", "dnsmasq") if shutil.which(p) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)} (apt-get install dnsperf dnsmasq-base)")
    seconds = 5.0 if quick else 10.0
    with tempfile.TemporaryDirectory(prefix="meshd-bench-dns-") as tmp:
        root = Path(tmp)
        zone = build_zone(MEMBERS)
        hosts, data = write_inputs(zone, root, 20_000)
        result: dict[str, Any] = {
            "members": MEMBERS,
            "names": len(zone),
            "rate": RATE,
            "seconds": seconds,
            "query_mix": {"A": 0.4, "AAAA": 0.4, "PTR": 0.1, "NXDOMAIN": 0.1},
            "rounds": [],
        }
        servers = [("meshd", lambda: meshd_server(MEMBERS, root)),
                   ("dnsmasq", lambda: dnsmasq_server(hosts, root))]  # fmt: skip
        for i in range(runs):
            one: dict[str, Any] = {"load_average": os.getloadavg()[0]}
            order = servers if i % 2 == 0 else servers[::-1]
            with contextlib.ExitStack() as stack:  # fresh servers: the first slices are cold
                ports = {label: stack.enter_context(server()) for label, server in order}
                fixed = fixed_rate(ports, data, seconds)
                for label, port in ports.items():
                    one[label] = {
                        "fixed_rate": fixed[label],
                        "throughput": dnsperf(port, data, seconds, None),
                    }
            one["throughput_ratio"] = _ratio(one)
            result["rounds"].append(one)
        for label, _ in servers:
            result[label] = _medians([r[label] for r in result["rounds"]])
        result["throughput_ratio"] = _ratio(result)
        return result


def _ratio(result: dict[str, Any]) -> float | None:
    ours, theirs = result["meshd"]["throughput"]["qps"], result["dnsmasq"]["throughput"]["qps"]
    return round(ours / theirs, 3) if ours and theirs else None


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's figures over the rounds: each number the median of its rounds."""
    if len(rounds) == 1:
        return rounds[0]

    def med(values: list[Any]) -> Any:
        nums = [v for v in values if isinstance(v, (int, float))]
        return statistics.median(nums) if nums else None

    out: dict[str, Any] = {}
    for phase in ("fixed_rate", "throughput"):
        phases = [r[phase] for r in rounds]
        merged = {k: med([p.get(k) for p in phases]) for k in _SUMMARY}
        if phase == "fixed_rate":
            lats = [p.get("latency_ms", {}) for p in phases]
            keys = ("n", "p50", "p90", "p99", "p99_9", "max", "mean")
            merged["latency_ms"] = {k: med([lat.get(k) for lat in lats]) for k in keys}
        out[phase] = merged
    return out


def quiet_rounds(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds in which the hypervisor took less than :data:`QUIET_STEAL_PCT` of the
    CPU during both servers' fixed-rate slices, and both have latencies."""
    return [
        one for one in rounds
        if all(
            (one[label]["fixed_rate"].get("steal_pct") or 100) < QUIET_STEAL_PCT
            and one[label]["fixed_rate"].get("latency_ms", {}).get("n")
            for label in ("meshd", "dnsmasq")
        )
    ]  # fmt: skip


def format_summary(result: dict[str, Any]) -> str:
    rounds = result.get("rounds", [])
    lines = [
        f"DNS on loopback (dnsperf, {result['members']} members, {result['names']} names, "
        f"{result['seconds']:.0f} s per phase"
        + (f", medians of {len(rounds)} rounds)" if len(rounds) > 1 else ")")
    ]
    if len(rounds) > 1:
        for i, one in enumerate(rounds, 1):
            parts = []
            for label in ("meshd", "dnsmasq"):
                lat = one[label]["fixed_rate"].get("latency_ms", {})
                qps = one[label]["throughput"].get("qps") or 0
                slices = [x for x in one[label]["fixed_rate"].get("slice_p99_ms", []) if x]
                spread = f" (slices {min(slices):.2f}-{max(slices):.2f})" if slices else ""
                steal = one[label]["fixed_rate"].get("steal_pct")
                if lat.get("n"):
                    parts.append(
                        f"{label} p50/p99/p99.9 {lat['p50']:.3f}/{lat['p99']:.2f}{spread}/"
                        f"{lat['p99_9']:.2f} ms, steal {steal}% {qps:.0f} q/s"
                    )
            lines.append(
                f"  round {i} (load {one['load_average']:.2f}): " + "; ".join(parts)
                + f"; ratio {one['throughput_ratio'] or 0:.2f}"
            )  # fmt: skip
    for label in ("meshd", "dnsmasq"):
        fixed, top = result[label]["fixed_rate"], result[label]["throughput"]
        lat = fixed.get("latency_ms", {})
        if lat.get("n"):
            lines.append(
                f"  {label:<8} at {result['rate']} q/s: p50 {lat['p50']:.3f} ms, p99 "
                f"{lat['p99']:.3f} ms, p99.9 {lat['p99_9']:.3f} ms, max {lat['max']:.2f} ms, "
                f"lost {fixed.get('lost') or 0:.0f}"
            )
        qps, lost = top.get("qps") or 0, top.get("lost") or 0
        lines.append(f"  {label:<8} throughput: {qps:.0f} q/s (lost {lost:.0f})")
    if result.get("throughput_ratio") is not None:
        lines.append(f"  meshd / dnsmasq throughput: {result['throughput_ratio']:.2f}")
    if len(rounds) > 1:
        met = {
            label: sum(
                1 for one in rounds
                if (one[label]["fixed_rate"].get("latency_ms", {}).get("p99") or 99) < P99_GOAL_MS
            )
            for label in ("meshd", "dnsmasq")
        }  # fmt: skip
        lines.append(
            f"  rounds with p99 < {P99_GOAL_MS:g} ms: meshd {met['meshd']}, "
            f"dnsmasq {met['dnsmasq']} of {len(rounds)}"
        )
        quiet = quiet_rounds(rounds)
        if quiet:
            p99 = {
                label: statistics.median(
                    one[label]["fixed_rate"]["latency_ms"]["p99"] for one in quiet
                )
                for label in ("meshd", "dnsmasq")
            }
            lines.append(
                f"  {len(quiet)} quiet rounds (steal < {QUIET_STEAL_PCT:g} %): median p99 "
                f"meshd {p99['meshd']:.2f} ms, dnsmasq {p99['dnsmasq']:.2f} ms"
            )
        else:
            lines.append(f"  no quiet round (steal < {QUIET_STEAL_PCT:g} % for both servers)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dns", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5 s phases instead of 10 s")
    parser.add_argument(
        "--runs", type=int, default=1, help="rounds of both servers; figures are medians"
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--members", type=int, default=MEMBERS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.members)
        return 0
    from benchmarks.common import load_average, machine_info, write_json

    load_before = load_average()
    result = run(args.quick, max(1, args.runs))
    result["machine"] = machine_info()
    result["load_average"] = {"before": load_before, "after": load_average()}
    print(format_summary(result))
    print(f"  (load average before {load_before}, after {result['load_average']['after']})")
    if args.json:
        args.json.write_text(__import__("json").dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        print(f"  written to {write_json(NAME, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
