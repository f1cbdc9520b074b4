"""Overlay DNS end to end: agents in network namespaces with wireguard-go, asked with
``dig`` from another host, through a tunnel, at the server's overlay addresses.

Four hosts (h1 with hostname ``web.prod``, h2 with ``db``). Every server is asked the
same questions (A, AAAA, address-derived names, PTR for both families, ``leader``,
NXDOMAIN, NODATA, case variants) over UDP at its overlay IPv4 address and over TCP at
its overlay IPv6 address, each time by a different host than itself; every answer
must be the expected one, so every node answers identically. Then h4 runs ``meshd
leave``: its names become NXDOMAIN on every remaining node; then h2 changes its
hostname (``POST /v1/record``): ``db`` becomes NXDOMAIN and ``api`` appears
everywhere.

All traffic stays in the namespaces built here (meshd.netns: underlay 192.0.2.0/24),
whose names, like the WireGuard interfaces', include this process's PID.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.netns import Hosts, built, run, until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TUN)"),
]

TAG = f"{os.getpid() % 100_000}"
N = 4
HOSTNAMES = {1: "web.prod", 2: "db"}
RUN_ARGS = ("--wg-backend", "userspace", "--profile", "local", "--dns-upstream", "off")
PORT = "15353"  # the default: 127.0.0.1 and the overlay addresses
Z = "mesh.internal"

Query = tuple[str, ...]
Answer = tuple[str, tuple[str, ...]]  # (status, sorted answer data)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Hosts]:
    with built(tmp_path, N, f"dns{TAG}", f"dn{TAG}", ("wireguard-go", "dig")) as hosts:
        yield hosts


def dig(mesh: Hosts, via: int, server: str, queries: list[Query], tcp: bool) -> list[Answer]:
    """Every query in one ``dig`` run in host ``via``'s namespace; [] if any failed."""
    args = [a for q in queries for a in q]
    res = run(
        *mesh.exec_args(via, "dig", f"@{server}", "-p", PORT, "+time=2", "+tries=2",
                        "+noall", "+comments", "+answer", *(["+tcp"] if tcp else []), *args),
        check=False, timeout=60,
    )  # fmt: skip
    chunks = res.stdout.split(";; Got answer:")[1:]
    if len(chunks) != len(queries):
        return []
    out = []
    for chunk in chunks:
        m = re.search(r"status: (\w+)", chunk)
        assert m, chunk
        data = [ln.split()[4].lower() for ln in chunk.splitlines() if ln and ln[0] != ";"]
        out.append((m.group(1), tuple(sorted(data))))
    return out


def plan(
    addrs: dict[int, dict[str, str]], hostnames: dict[int, str], zone: bool = True
) -> dict[Query, Answer]:
    """The questions and the one right answer to each, for the members in ``addrs``
    (and, with ``zone``, the names that are not a member's)."""
    want: dict[Query, Answer] = {}
    for i, a in addrs.items():
        o3, o4 = a["ipv4"].split(".")[2:]
        want[(f"h{i}.{Z}", "A")] = ("NOERROR", (a["ipv4"],))
        want[(f"H{i}.Mesh.INTERNAL", "AAAA")] = ("NOERROR", (a["ipv6"],))
        want[(f"node-{o3}-{o4}.{Z}", "A")] = ("NOERROR", (a["ipv4"],))
        want[("-x", a["ipv4"])] = ("NOERROR", (f"h{i}.{Z}.",))
        want[("-x", a["ipv6"])] = ("NOERROR", (f"h{i}.{Z}.",))
    for i, name in hostnames.items():
        want[(f"{name.upper()}.{Z}", "A")] = ("NOERROR", (addrs[i]["ipv4"],))
        want[(f"{name}.{Z}", "AAAA")] = ("NOERROR", (addrs[i]["ipv6"],))
    if zone:
        want[(f"leader.{Z}", "A")] = ("NOERROR", (addrs[1]["ipv4"],))
        want[(f"nope.{Z}", "A")] = ("NXDOMAIN", ())
        want[(f"h1.{Z}", "MX")] = ("NOERROR", ())  # NODATA
    return want


def ask_everyone(
    mesh: Hosts, up: list[int], addrs: dict[int, dict[str, str]], want: dict[Query, Answer]
) -> dict[tuple[int, bool], dict[Query, Answer]]:
    """Every host in ``up`` asked everything, over UDP (overlay IPv4) and TCP (overlay
    IPv6), each by the next host in ``up``: {(server, tcp): {query: answer}}."""
    queries = list(want)
    got = {}
    for k, j in enumerate(up):
        via = up[(k + 1) % len(up)]
        for tcp, server in ((False, addrs[j]["ipv4"]), (True, addrs[j]["ipv6"])):
            answers = dig(mesh, via, server, queries, tcp)
            got[(j, tcp)] = dict(zip(queries, answers, strict=True)) if answers else {}
    return got


def all_right(mesh: Hosts, up: list[int], addrs: Any, want: dict[Query, Answer]) -> bool:
    return all(g == want for g in ask_everyone(mesh, up, addrs, want).values())


def test_dns_in_namespaces_same_everywhere_leave_and_rename(mesh: Hosts) -> None:
    def host_args(i: int) -> list[str]:
        extra = ["--hostname", HOSTNAMES[i]] if i in HOSTNAMES else []
        return [*mesh.node_args(i), *extra, *RUN_ARGS]

    t0 = time.monotonic()
    mesh.start(1, "up", *host_args(1))
    status = {1: until(lambda: mesh.get(1, "/v1/status"), 60, "h1's agent")}
    token = mesh.meshd(1, "token", "--data-dir", str(mesh.datadir(1)), "--uses", "10")
    seed = f"{mesh.underlay(1)}:7946"
    for i in range(2, N + 1):
        mesh.start(i, "up", *host_args(i), "--seed", seed, "--token", token.stdout.strip())
    for i in range(1, N + 1):
        status[i] = until(lambda i=i: mesh.get(i, "/v1/status"), 60, f"h{i}'s agent")
        mesh.wg_pids.add(status[i]["wireguard"]["pid"])
    addrs = {i: status[i]["addresses"] for i in status}
    up = list(range(1, N + 1))
    t_up = time.monotonic()

    # Every node serves the same zone once gossip has converged; each listens on its
    # overlay addresses at the default port.
    def same_zones() -> bool:
        views = [mesh.get(i, "/v1/dns") for i in up]
        rows = {tuple(map(str, v["records"])) for v in views if v}
        return len(rows) == 1 and len(views[0]["records"]) >= 5 * N

    until(same_zones, 60, "every node to serve the same zone", step=0.3)
    listen = mesh.get(3, "/v1/dns")["server"]["listen"]
    assert f"{addrs[3]['ipv4']}:{PORT}" in listen and f"[{addrs[3]['ipv6']}]:{PORT}" in listen

    t_zone = time.monotonic()
    want = plan(addrs, HOSTNAMES)
    until(lambda: all_right(mesh, up, addrs, want), 60, "every node's answers", step=0.5)
    asked = len(want)
    for i in up:  # the TCP answers really came over TCP
        assert mesh.get(i, "/v1/dns")["server"]["stats"].get("queries_tcp", 0) >= len(want)

    t_ok = time.monotonic()

    # h4 leaves: its names (node, address-derived, PTR) are NXDOMAIN on every other node.
    res = mesh.meshd(4, "leave", "--data-dir", str(mesh.datadir(4)))
    assert res.returncode == 0, res.stderr
    assert mesh.procs[4].wait(20) == 0, mesh.log(4)
    up = [1, 2, 3]
    gone = plan({4: addrs[4]}, {}, zone=False)
    want = plan({i: addrs[i] for i in up}, HOSTNAMES)
    want |= {q: ("NXDOMAIN", ()) for q in gone if q not in want}
    until(lambda: all_right(mesh, up, addrs, want), 60, "h4 gone from every node", step=0.5)

    t_left = time.monotonic()

    # h2 renames itself: "db" disappears and "api" appears on every node.
    assert mesh.post(2, "/v1/record", {"hostname": "api"}) is not None
    renamed = {**HOSTNAMES, 2: "api"}
    want = plan({i: addrs[i] for i in up}, renamed)
    want |= {q: ("NXDOMAIN", ()) for q in gone if q not in want}
    want[(f"db.{Z}", "A")] = ("NXDOMAIN", ())
    until(lambda: all_right(mesh, up, addrs, want), 60, "the new hostname everywhere", step=0.5)
    t_end = time.monotonic()
    print(
        f"\nagents up {t_up - t0:.1f} s, zones equal {t_zone - t_up:.1f} s, {asked} "
        f"queries x {N} servers x UDP+TCP right {t_ok - t_zone:.1f} s, leave seen "
        f"{t_left - t_ok:.1f} s, rename seen {t_end - t_left:.1f} s"
    )
