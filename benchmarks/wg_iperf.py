"""iperf3 over the overlay meshd manages versus the same wireguard-go set up by hand.

Two network namespaces on a bridge (``meshd.netns.Hosts``). In them, at the same time:

* ``meshd``: ``meshd init`` + ``run`` in host 1, ``meshd up`` in host 2, userspace
  backend (wireguard-go started and configured by the agent), overlay addresses from
  meshd (10.200.0.0/16, fd00:200::/48);
* ``hand``: a second wireguard-go interface per host, started here (``wireguard-go
  -f``) in a session of its own, as meshd starts its wireguard-go, and configured with
  ``wg set`` (fresh keys, listen port 51821, keepalive 25 s like meshd) and ``ip
  addr``/``ip route`` (10.99.0.0/24, MTU 1420 like meshd's default), no agent;
* ``hand_same_session``: a third pair, set up the same way but left in this process's
  session, as ``wireguard-go wg0`` typed in a shell is (it does not call setsid).

The session matters here, not meshd: the kernel's autogroup scheduling
(``/proc/sys/kernel/sched_autogroup_enabled``) gives each session its own share of the
CPU, and with the iperf3 client and server in this process's session, a wireguard-go
in the same session is scheduled differently. So ``meshd`` is compared with ``hand``
(same placement); ``hand_same_session`` shows the size of the placement effect.

One ``iperf3 -s`` in host 2; ``iperf3 -c`` from host 1 to host 2's IPv4 address on one
overlay or another (TCP, host 1 to host 2, the first second omitted as slow start),
one run per side per round, the order reversed every round (ABC CBA ...) so that a slow
drift of the machine's load hits every side alike. Reported: each side's throughputs
(median, min, max), the ratio of the medians and of each round's meshd/hand pair, and
the CPU time meshd's agents used during their runs (what "meshd adds" could be).
Everything started is killed by PID and the namespaces are deleted however it ends.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

from benchmarks.common import summarise
from benchmarks.procstat import cpu_seconds
from benchmarks.wg_mesh import Settings as MeshSettings
from benchmarks.wg_mesh import built, mesh_up, require_root, tag
from meshd import netns
from meshd.netns import Hosts

NAME: Final = "wg_iperf"
HAND_PORT: Final = 51821
MTU: Final = 1420
IPERF_PORT: Final = 5201


@dataclass(frozen=True)
class Settings:
    rounds: int  # one iperf3 run per side per round, the order reversed every round
    seconds: int  # each iperf3 run, after the omitted first second

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        return cls(rounds=3, seconds=3) if quick else cls(rounds=8, seconds=5)


class HandMade:
    """wireguard-go interfaces in hosts 1 and 2, configured only with ``wg`` and ``ip``."""

    def __init__(self, hosts: Hosts, index: int = 0, new_session: bool = True) -> None:
        self.hosts = hosts
        self.names = {i: f"wb{tag()}m{index}{i}" for i in (1, 2)}
        self.port = HAND_PORT + index
        self.net, self.net6 = f"10.99.{index}", f"fd00:99:{index}::"
        self.new_session = new_session
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def addr(self, i: int) -> str:
        return f"{self.net}.{i}"

    def start(self) -> None:
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        keys: dict[int, tuple[str, str]] = {}
        for i, name in self.names.items():
            self.procs[i] = subprocess.Popen(
                self.hosts.exec_args(i, "wireguard-go", "-f", name),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=self.new_session,
            )
            private = netns.run("wg", "genkey").stdout.strip()
            public = subprocess.run(
                ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
            ).stdout.strip()
            keys[i] = (private, public)
        for i, name in self.names.items():
            sock = f"/var/run/wireguard/{name}.sock"
            netns.until(partial(os.path.exists, sock), 10, f"{name}'s UAPI socket", step=0.05)
            j = 3 - i
            keyfile = self.hosts.root / f"hand{i}.key"
            keyfile.write_text(keys[i][0] + "\n")
            keyfile.chmod(0o600)
            ns = self.hosts.ns[i - 1]
            netns.run(
                *self.hosts.exec_args(
                    i, "wg", "set", name, "private-key", str(keyfile),
                    "listen-port", str(self.port), "peer", keys[j][1],
                    "allowed-ips", f"{self.addr(j)}/32,{self.net6}{j}/128",
                    "endpoint", f"{self.hosts.underlay(j)}:{self.port}",
                    "persistent-keepalive", "25",
                )
            )  # fmt: skip
            netns.run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/32", "dev", name)
            netns.run("ip", "-n", ns, "addr", "add", f"{self.net6}{i}/128", "dev", name)
            netns.run("ip", "-n", ns, "link", "set", name, "mtu", str(MTU), "up")
            netns.run("ip", "-n", ns, "route", "add", f"{self.net}.0/24", "dev", name)
            netns.run("ip", "-n", ns, "-6", "route", "add", f"{self.net6}/64", "dev", name)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def iperf(hosts: Hosts, target: str, seconds: int, attempts: int = 10) -> dict[str, Any]:
    """One TCP iperf3 run from host 1 to ``target``; received Mbit/s and retransmits.

    The server takes a moment to start, and to finish one test before it accepts the
    next ("the server is busy", "connection reset"): up to ``attempts`` tries, half a
    second apart, before an error is final.
    """
    for _ in range(attempts):
        res = netns.run(
            *hosts.exec_args(
                1, "iperf3", "-c", target, "-p", str(IPERF_PORT),
                "-t", str(seconds), "-O", "1", "-J",
            ),
            check=False,
            timeout=seconds + 30,
        )  # fmt: skip
        try:
            out = json.loads(res.stdout)
        except ValueError:
            raise RuntimeError(
                f"iperf3 to {target}: {res.stderr.strip() or res.stdout[-300:]}"
            ) from None
        if "error" not in out:
            break
        time.sleep(0.5)
    if "error" in out:
        raise RuntimeError(f"iperf3 to {target}: {out['error']}")
    end = out["end"]
    return {
        "mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
        "retransmits": end["sum_sent"].get("retransmits"),
    }


SIDES: Final = ("meshd", "hand", "hand_same_session")


def run(quick: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    require_root()
    settings = settings or Settings.for_mode(quick)
    mesh_settings = MeshSettings(nodes=2, runs=1, backend="userspace", profile="lan")
    samples: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with (
        tempfile.TemporaryDirectory(prefix="meshd-bench-iperf-") as tmp,
        built(Path(tmp), 2, f"wi{tag()}") as hosts,
    ):
        poller = mesh_up(hosts, mesh_settings, 120)
        targets = {"meshd": poller.addresses()[2]["ipv4"]}
        agents = [p.pid for p in hosts.procs.values()]
        hand = {
            "hand": HandMade(hosts, 0, new_session=True),
            "hand_same_session": HandMade(hosts, 1, new_session=False),
        }
        server: subprocess.Popen[bytes] | None = None
        try:
            for side, made in hand.items():
                made.start()
                targets[side] = made.addr(2)
                netns.until(partial(hosts.ping, 1, made.addr(2)), 30, f"the {side} tunnel")
            server = subprocess.Popen(
                hosts.exec_args(2, "iperf3", "-s", "-p", str(IPERF_PORT)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            for side in SIDES:  # warm-up, untimed
                iperf(hosts, targets[side], 1)
            for r in range(settings.rounds):
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    before = sum(cpu_seconds(pid) or 0.0 for pid in agents)
                    t = time.monotonic()
                    sample = iperf(hosts, targets[side], settings.seconds)
                    sample["agents_cpu_s"] = round(
                        sum(cpu_seconds(pid) or 0.0 for pid in agents) - before, 3
                    )
                    sample["wall_s"] = round(time.monotonic() - t, 2)
                    samples[side].append(sample)
        finally:
            if server is not None and server.poll() is None:
                server.kill()
                server.wait(5)
            for made in hand.values():
                made.stop()
    mbit = {side: [s["mbit_s"] for s in samples[side]] for side in SIDES}
    ratios = [m / h for m, h in zip(mbit["meshd"], mbit["hand"], strict=True) if h > 0]
    return {
        "benchmark": NAME,
        "mode": "quick" if quick else "full",
        "settings": asdict(settings),
        "summary": {
            **{f"{side}_mbit_s": summarise(mbit[side]) for side in SIDES},
            "ratio_of_medians": round(
                statistics.median(mbit["meshd"]) / statistics.median(mbit["hand"]), 3
            ),
            "paired_ratio": summarise([round(r, 3) for r in ratios]),
            "agents_cpu_s_per_run": summarise([s["agents_cpu_s"] for s in samples["meshd"]]),
        },
        "samples": samples,
    }


def format_summary(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        f"iperf3 TCP over wireguard-go, 2 namespaces, {res['settings']['rounds']} rounds of "
        f"{res['settings']['seconds']} s runs per side (Mbit/s)",
        f"  {'overlay':<18} {'median':>8} {'min':>8} {'max':>8} {'n':>3}",
    ]
    for side in SIDES:
        st = s[f"{side}_mbit_s"]
        lines.append(
            f"  {side:<18} {st['median']:>8.0f} {st['min']:>8.0f} {st['max']:>8.0f} {st['n']:>3}"
        )
    pr = s["paired_ratio"]
    lines.append(
        f"  meshd/hand: ratio of medians {s['ratio_of_medians']:.3f}; per round median "
        f"{pr['median']:.3f} ({pr['min']:.3f} to {pr['max']:.3f}); meshd agents' CPU during "
        f"a meshd run {s['agents_cpu_s_per_run']['median']:.2f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_summary(run(quick=True)))
