"""``meshd demo`` end to end, as a user runs it.

As root: three hosts in network namespaces with the real WireGuard data plane, for
``--duration 5``; the output must show every member alive with a direct tunnel, pings
over IPv4 and IPv6, DNS answers from another host's overlay address; afterwards no
namespace, UAPI socket, process or data directory of the demo may remain.
With ``--loopback``: agents on 127.0.0.1 with the memory backend, stopped by SIGINT
(Ctrl-C) like a user would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshd.netns import run

pytestmark = pytest.mark.integration

ROOT = os.geteuid() == 0


def demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshd", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo tears down on SIGTERM too
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"demo did not finish within {timeout} s:\n{out}")
    assert proc.returncode == 0, out
    return out


def processes_mentioning(*needles: str) -> list[str]:
    """Command lines of live processes that contain any of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(f"{entry}: {cmd}")
    return found


def peers_rows(out: str) -> dict[str, list[str]]:
    """The ``meshd peers`` table of the demo's output, by member name."""
    header = re.search(r"^NAME +IPV4 ", out, re.M)
    assert header, out
    lines = out[header.start() :].splitlines()[1:]
    rows = {}
    for line in lines:
        if not line.strip():
            break
        f = [c for c in line.split() if c != "*"]  # "*" marks the row of the host asked
        rows[f[0]] = f[1:]
    return rows


@pytest.mark.skipif(not ROOT, reason="needs root (network namespaces, TUN)")
def test_demo_in_namespaces_with_wireguard() -> None:
    missing = [t for t in ("wireguard-go", "ip", "ping", "dig") if shutil.which(t) is None]
    assert not missing, f"missing {missing}: make deps installs them"
    proc = demo("--nodes", "3", "--duration", "5")
    tag = proc.pid % 100_000  # the demo names everything after its PID
    out = finish(proc, 240)

    hosts = re.findall(r"^  (h\d): .*?(10\.200\.\S+) (fd00:200::\S+)", out, re.M)
    assert [h[0] for h in hosts] == ["h1", "h2", "h3"], out
    assert re.search(r"WireGuard (userspace|kernel) on mesh\d+-h1", out), out
    assert "joined through h1" in out
    assert len(re.findall(r", 0% packet loss", out)) == 2, out  # IPv4 and IPv6
    rows = peers_rows(out)
    assert set(rows) == {"h1", "h2", "h3"}, out
    for name in ("h1", "h2"):
        assert rows[name][2:4] == ["alive", "direct"], rows[name]
    assert rows["h3"][2:4] == ["alive", "self"]
    v4, v6 = rows["h3"][0], rows["h3"][1]
    assert hosts[2][1:] == (v4, v6)
    dig = re.findall(r"^\$ ip netns exec \S+ dig @10\.200\.\S+ .* (A|AAAA)\n(\S+)$", out, re.M)
    assert dig == [("A", v4), ("AAAA", v6)], out
    assert "3/3 agents stopped cleanly; nothing left behind" in out, out

    # Checked here too, not only by the demo itself.
    ns = run("ip", "netns", "list").stdout
    assert f"md{tag}-" not in ns, ns
    wg = os.listdir("/var/run/wireguard") if os.path.isdir("/var/run/wireguard") else []
    assert not [s for s in wg if s.startswith(f"mesh{tag}-")], wg
    datadir = re.search(r"data in (\S+)", out)
    assert datadir and not os.path.exists(datadir.group(1))
    assert processes_mentioning(datadir.group(1), f"mesh{tag}-") == []


def test_demo_on_loopback_stops_on_ctrl_c() -> None:
    proc = demo("--loopback", "--nodes", "3")
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # readline blocks; the demo prints steadily
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("Ctrl-C to stop"):
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + finish(proc, 60)
    assert "loopback mode (--loopback was given)" in out, out
    rows = peers_rows(out)
    assert set(rows) == {"node1", "node2", "node3"}, out
    assert all(r[2] == "alive" for r in rows.values()), rows
    dig = re.findall(r"^\$ dig @127\.0\.0\.1 .* (A|AAAA)\n(\S+)$", out, re.M)
    assert dig == [("A", rows["node3"][0]), ("AAAA", rows["node3"][1])], out
    assert "demo stopped; all agents terminated" in out
    datadir = re.search(r"data in (\S+)", out)
    assert datadir and not os.path.exists(datadir.group(1))
    assert processes_mentioning(datadir.group(1)) == []
