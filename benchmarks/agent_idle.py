"""What an idle ``meshd`` agent costs: CPU seconds per 30 s and memory, per agent.

Cases (N agents, so each has N-1 peers; default gossip profile ``lan``; DNS server on):

* ``netns_userspace_10``: 10 agents, each in its own network namespace with the
  userspace backend (a wireguard-go per agent), brought up as in ``wg_mesh``; the
  wireguard-go processes are measured too, separately (root only);
* ``loopback_memory_10`` and ``loopback_memory_50``: 10 and 50 agents on 127.0.0.1
  (``meshd.demo.LocalCluster``) with the in-process ``memory`` backend, so the
  reconciler and the peer tables run without an interface.

Once every agent sees every member alive (every pair pinging, for the namespaces), the
cluster is left alone for :data:`SETTLE_S`, then each agent's user+system CPU time
(``/proc/PID/stat``) is read at the start and end of each :data:`WINDOW_S` window, and
its memory at the end (VmRSS, its anonymous and file-backed parts, and PSS, which
shares library pages among the agents that map them). Reported: the median and range
over the agents, per window. For context, the RSS of a bare Python and of a Python
that has only imported what ``meshd run`` imports (``meshd.cli``, ``meshd.agent`` and
the rest), each idle in a child process: the difference between that and an agent is
the agent's own state.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks.common import summarise
from benchmarks.procstat import cpu_seconds, memory_kib
from benchmarks.wg_mesh import Settings as MeshSettings
from benchmarks.wg_mesh import built, mesh_up, tag
from meshd.demo import LocalCluster

NAME: Final = "agent_idle"
WINDOW_S: Final = 30.0
SETTLE_S: Final = 15.0
#: Joins (``meshd join`` + ``meshd run``) in flight at once on loopback.
JOIN_CONCURRENCY: Final = 2
#: How long a started agent may take to answer (after LocalCluster's own 20 s).
START_TIMEOUT_S: Final = 120.0
#: What ``meshd run`` imports before it starts (the baseline for the agents' memory).
AGENT_IMPORTS: Final = "import meshd.cli, meshd.agent, meshd.dns, meshd.http, meshd.wg.dataplane"


@dataclass(frozen=True)
class Settings:
    windows: int
    sizes: tuple[int, ...]  # loopback cluster sizes, memory backend
    netns_nodes: int  # 0: no namespace case

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        netns = 10 if os.geteuid() == 0 else 0
        return cls(windows=1 if quick else 3, sizes=(10, 50), netns_nodes=netns)


def measure(pids: dict[str, int], windows: int) -> list[dict[str, Any]]:
    """CPU seconds per :data:`WINDOW_S` and memory of each process, one entry per window."""
    out = []
    for _ in range(windows):
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(WINDOW_S)
        cpu = {}
        for name, pid in pids.items():
            now, then = cpu_seconds(pid), before[name]
            if now is not None and then is not None:
                cpu[name] = round(now - then, 3)
        mem = {name: m for name, pid in pids.items() if (m := memory_kib(pid)) is not None}
        out.append(
            {
                "alive": len(cpu),
                "cpu_s": summarise(list(cpu.values())),
                "rss_mib": summarise([m["VmRSS"] / 1024 for m in mem.values()]),
                "pss_mib": summarise([m["Pss"] / 1024 for m in mem.values() if "Pss" in m]),
                "anon_mib": summarise([m["RssAnon"] / 1024 for m in mem.values()]),
                "file_mib": summarise([m["RssFile"] / 1024 for m in mem.values()]),
                "per_process": {
                    name: {"cpu_s": cpu.get(name), **mem.get(name, {})} for name in pids
                },
            }
        )
    return out


def netns_case(n: int, windows: int) -> dict[str, Any]:
    """``n`` agents in namespaces with wireguard-go, measured once every pair pings."""
    settings = MeshSettings(nodes=n, runs=1, backend="userspace", profile="lan")
    with (
        tempfile.TemporaryDirectory(prefix="meshd-bench-idle-") as tmp,
        built(Path(tmp), n, f"wa{tag()}") as hosts,
    ):
        poller = mesh_up(hosts, settings, 180)
        time.sleep(SETTLE_S)
        agents = {f"h{i}": p.pid for i, p in hosts.procs.items()}
        wg = {f"h{i}": int(st["wireguard"]["pid"]) for i, st in poller.status.items()}
        windows_out = measure({**agents, **{f"wg-{k}": v for k, v in wg.items()}}, windows)
    return {
        "agents": n,
        "backend": "userspace",
        "windows": [_split(w, agents) for w in windows_out],
    }


def _split(window: dict[str, Any], agents: dict[str, int]) -> dict[str, Any]:
    """Separate the agents' figures from their wireguard-go processes'."""
    per = window["per_process"]
    out: dict[str, Any] = {"per_process": per}
    for label, names in (("agents", list(agents)), ("wireguard_go", [f"wg-{k}" for k in agents])):
        rows = [per[n] for n in names if per[n].get("cpu_s") is not None]
        out[label] = {
            "alive": len(rows),
            "cpu_s": summarise([r["cpu_s"] for r in rows]),
            "rss_mib": summarise([r["VmRSS"] / 1024 for r in rows if "VmRSS" in r]),
            "pss_mib": summarise([r["Pss"] / 1024 for r in rows if "Pss" in r]),
            "anon_mib": summarise([r["RssAnon"] / 1024 for r in rows if "RssAnon" in r]),
        }
    return out


def loopback_case(n: int, windows: int) -> dict[str, Any]:
    """``n`` agents on 127.0.0.1 with the memory backend, measured once converged."""
    with tempfile.TemporaryDirectory(prefix="meshd-bench-idle-") as tmp:
        cluster = LocalCluster(Path(tmp))
        names = [f"n{i}" for i in range(1, n + 1)]

        def run_args() -> list[str]:
            dns = f"127.0.0.1:{cluster.port(socket.SOCK_STREAM)}"
            return [
                "--wg-backend", "memory", "--profile", "lan",
                "--dns", dns, "--dns-upstream", "off",
            ]  # fmt: skip

        try:
            res = cluster.init(names[0])
            if res.returncode != 0:
                raise RuntimeError(f"meshd init: {res.stderr.strip()}")
            cluster.start(names[0], *run_args())
            token = cluster.token(names[0], "--uses", str(n + 5))

            def join(name: str) -> None:
                res = cluster.join(name, names[0], token)
                if res.returncode != 0:
                    raise RuntimeError(f"meshd join {name}: {res.stderr.strip()}")
                try:
                    cluster.start(name, *run_args())
                except RuntimeError:  # slow to answer on a loaded machine: give it longer
                    cluster.wait_http(name, timeout=START_TIMEOUT_S)

            t0 = time.monotonic()
            with ThreadPoolExecutor(JOIN_CONCURRENCY) as pool:
                list(pool.map(join, names[1:]))
            converged = cluster.wait_converged(names, timeout=180)
            up_s = time.monotonic() - t0
            time.sleep(SETTLE_S)
            pids = {name: p.pid for name, p in cluster.procs.items()}
            windows_out = measure(pids, windows)
        finally:
            cluster.stop_all()
    return {
        "agents": n,
        "backend": "memory",
        "joined_and_converged_s": round(up_s, 1),
        "converged_after_last_start_s": round(converged, 1),
        "windows": windows_out,
    }


def baseline_rss() -> dict[str, Any]:
    """RSS of an idle bare Python and of one that has imported what an agent imports."""
    code = (
        "import sys, time\n{imports}\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\ntime.sleep(60)"
    )
    out: dict[str, Any] = {}
    for label, imports in (("python", "pass"), ("python_meshd_imports", AGENT_IMPORTS)):
        proc = subprocess.Popen(
            [sys.executable, "-c", code.format(imports=imports)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            mem = memory_kib(proc.pid) or {}
            out[label] = {k: round(v / 1024, 1) for k, v in mem.items()}
        finally:
            proc.kill()
            proc.wait(5)
    out["modules_imported"] = subprocess.run(
        [sys.executable, "-c", f"import sys\n{AGENT_IMPORTS}\nprint(len(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    return out


def run(quick: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings.for_mode(quick)
    cases: dict[str, Any] = {}
    errors: list[str] = []
    if settings.netns_nodes:
        try:
            cases[f"netns_userspace_{settings.netns_nodes}"] = netns_case(
                settings.netns_nodes, settings.windows
            )
        except (TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(f"netns: {type(exc).__name__}: {exc}")
    for n in settings.sizes:
        try:
            cases[f"loopback_memory_{n}"] = loopback_case(n, settings.windows)
        except (TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(f"loopback {n}: {type(exc).__name__}: {exc}")
    if not cases:
        raise RuntimeError("; ".join(errors))
    return {
        "benchmark": NAME,
        "mode": "quick" if quick else "full",
        "settings": {**asdict(settings), "window_s": WINDOW_S, "settle_s": SETTLE_S},
        "baseline_rss_mib": baseline_rss(),
        "cases": cases,
        "errors": errors,
    }


def format_summary(res: dict[str, Any]) -> str:
    lines = [
        f"idle agents: CPU seconds per {res['settings']['window_s']:.0f} s and memory (MiB) per "
        "process, medians over the processes [min-max], one row per window",
        f"  {'case':<24} {'cpu s':>16} {'RSS':>16} {'PSS':>16} {'anon':>7}",
    ]

    def row(label: str, st: dict[str, Any]) -> str:
        def cell(s: dict[str, Any], fmt: str) -> str:
            if not s["n"]:
                return "-"
            return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"

        return (
            f"  {label:<24} {cell(st['cpu_s'], '.2f'):>16} {cell(st['rss_mib'], '.0f'):>16} "
            f"{cell(st['pss_mib'], '.0f'):>16} {st['anon_mib']['median'] or 0:>7.0f}"
        )

    for key, case in res["cases"].items():
        for w in case["windows"]:
            if "agents" in w:
                lines.append(row(f"{key} agent", w["agents"]))
                lines.append(row(f"{key} wg-go", w["wireguard_go"]))
            else:
                lines.append(row(key, w))
    base = res["baseline_rss_mib"]
    lines.append(
        f"  baseline RSS: bare python {base['python'].get('VmRSS')} MiB, after meshd's "
        f"imports ({base['modules_imported']} modules) {base['python_meshd_imports'].get('VmRSS')}"
        f" MiB (anon {base['python_meshd_imports'].get('RssAnon')})"
    )
    if res["errors"]:
        lines.append(f"  not measured: {'; '.join(res['errors'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_summary(run(quick=True)))
