"""Overlay DNS between real agents on loopback, asked with ``dig``.

Four ``meshd`` processes (each with its own DNS port on 127.0.0.1): A, AAAA and PTR for
node names, hostnames, address-derived names and ``leader``; NXDOMAIN; UDP and +tcp;
case variants; the same answers from every node; a hostname conflict reported on every
node; a hostname change moving; forwarding to a fake upstream on loopback and REFUSED
where forwarding is off; a member that leaves disappearing from every node.

Every process is started through ``LocalCluster`` (tracked by PID, stopped in the
fixture's teardown); all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from meshd.demo import LocalCluster
from meshd.state import DataDir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed (dnsutils)"),
]

NAMES = ["alpha", "beta", "gamma", "delta"]
HOSTNAMES = {"alpha": "web.prod", "beta": "alpha", "gamma": "db"}  # beta's clashes
RUN = ("--profile", "lan", "--timing", "push_pull_interval=2s")
DEADLINE = 20.0


class FakeUpstream:
    """A resolver on 127.0.0.1 that answers every A query with 192.0.2.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.queries += 1
            q = DNSRecord.parse(data)
            r = q.reply()
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=30))
            self.sock.sendto(r.pack(), addr)

    def stop(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    u = FakeUpstream()
    yield u
    u.stop()


def dig(port: int, *args: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(status, [(name, type, data)]) of one ``dig`` query to 127.0.0.1:port."""
    res = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=2", "+noall", "+comments",
         "+answer", *args],
        capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip
    m = re.search(r"status: (\w+)", res.stdout)
    assert m, f"dig {' '.join(args)} failed: {res.stdout} {res.stderr}"
    rows = []
    for line in res.stdout.splitlines():
        if line and not line.startswith(";"):
            f = line.split()
            rows.append((f[0].lower(), f[3], f[4].lower()))
    return m.group(1), sorted(rows)


def until(probe: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or probe}: {last!r}")


def post(cluster: LocalCluster, name: str, path: str, body: dict[str, Any]) -> Any:
    token = DataDir(cluster.datadir(name)).read_key("http").hex()
    req = urllib.request.Request(
        f"http://127.0.0.1:{cluster.http[name]}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def start_cluster(cluster: LocalCluster, upstream: FakeUpstream) -> dict[str, int]:
    ports = {}
    for i, name in enumerate(NAMES):
        extra = ["--hostname", HOSTNAMES[name]] if name in HOSTNAMES else []
        if i == 0:
            res = cluster.init(name, *extra)
        else:
            res = cluster.join(name, NAMES[i - 1], cluster.token(NAMES[0]), *extra)
        assert res.returncode == 0, res.stderr
        ports[name] = cluster.port_udp_tcp()
        fwd = f"127.0.0.1:{upstream.port}" if name == "beta" else "off"
        cluster.start(
            name, *RUN, "--dns", f"127.0.0.1:{ports[name]}", "--dns-upstream", fwd
        )  # fmt: skip
    cluster.wait_converged(NAMES, timeout=DEADLINE)
    return ports


def zone_rows(cluster: LocalCluster, name: str) -> list[tuple[str, str, str]]:
    rows = cluster.get(name, "/v1/dns")["records"]
    return sorted((r["name"], r["type"], r.get("address") or r.get("target")) for r in rows)


def test_every_member_resolves_the_same_everywhere(
    cluster: LocalCluster, upstream: FakeUpstream
) -> None:
    ports = start_cluster(cluster, upstream)
    # Every node serves the same zone once gossip has converged.
    until(lambda: len({tuple(zone_rows(cluster, n)) for n in NAMES}) == 1, what="same zones")
    views = {n: cluster.get(n, "/v1/dns") for n in NAMES}
    assert len({v["serial"] for v in views.values()}) == 1
    assert f"127.0.0.1:{ports['alpha']}" in views["alpha"]["server"]["listen"]
    members = {m["name"]: m for m in cluster.get("alpha", "/v1/members")["members"]}
    v4 = {n: members[n]["addresses"]["ipv4"] for n in NAMES}
    v6 = {n: members[n]["addresses"]["ipv6"] for n in NAMES}

    # The hostname "alpha" of beta loses to alpha's node name, on every node.
    for n in NAMES:
        [c] = views[n]["conflicts"]
        assert (c["name"], c["kind"], c["node_name"], c["winner_name"]) == (
            "alpha.mesh.internal.", "hostname", "beta", "alpha",
        )  # fmt: skip
    assert "dns name conflict" in (cluster.log_dir / "beta.log").read_text()

    queries: list[tuple[str, ...]] = []
    expect: dict[tuple[str, ...], tuple[str, list[str]]] = {}

    def q(args: tuple[str, ...], status: str, data: list[str]) -> None:
        queries.append(args)
        expect[args] = (status, sorted(data))

    for n in NAMES:
        last4 = v4[n].split(".")
        q((f"{n}.mesh.internal", "A"), "NOERROR", [v4[n]])
        q((f"{n}.mesh.internal", "AAAA"), "NOERROR", [v6[n]])
        q((f"node-{last4[2]}-{last4[3]}.mesh.internal", "A"), "NOERROR", [v4[n]])
        q(("-x", v4[n]), "NOERROR", [f"{n}.mesh.internal."])
        q(("-x", v6[n]), "NOERROR", [f"{n}.mesh.internal."])
    q(("web.prod.mesh.internal", "A"), "NOERROR", [v4["alpha"]])
    q(("WEB.Prod.MESH.internal", "AAAA"), "NOERROR", [v6["alpha"]])
    q(("DB.mesh.internal", "A"), "NOERROR", [v4["gamma"]])
    q(("leader.mesh.internal", "A"), "NOERROR", [v4["alpha"]])
    q(("node-1.mesh.internal", "AAAA"), "NOERROR", [v6["alpha"]])
    q(("nope.mesh.internal", "A"), "NXDOMAIN", [])
    q(("alpha.mesh.internal", "MX"), "NOERROR", [])
    q(("+tcp", "Gamma.Mesh.Internal", "A"), "NOERROR", [v4["gamma"]])
    q(("+tcp", "nope.mesh.internal", "AAAA"), "NXDOMAIN", [])
    for n in NAMES:
        for args in queries:
            status, rows = dig(ports[n], *args)
            assert (status, sorted(r[2] for r in rows)) == expect[args], (n, args)

    # Out of the zone: forwarded where an upstream is configured, refused elsewhere.
    status, rows = dig(ports["beta"], "www.example.com", "A")
    assert (status, [r[2] for r in rows]) == ("NOERROR", ["192.0.2.1"])
    assert upstream.queries == 1
    assert dig(ports["alpha"], "www.example.com", "A")[0] == "REFUSED"

    # A hostname change moves the name on every node and ends the conflict.
    post(cluster, "beta", "/v1/record", {"hostname": "api"})
    for n in NAMES:
        until(lambda n=n: dig(ports[n], "api.mesh.internal", "A")[1], what=f"api on {n}")
        assert cluster.get(n, "/v1/dns")["conflicts"] == []
        assert dig(ports[n], "alpha.mesh.internal", "A")[1][0][2] == v4["alpha"]

    # gamma leaves: its names disappear from every node that stays.
    res = cluster.meshd("leave", "--data-dir", str(cluster.datadir("gamma")))
    assert res.returncode == 0, res.stderr
    cluster.procs["gamma"].wait(15)
    rest = [n for n in NAMES if n != "gamma"]
    for n in rest:
        until(
            lambda n=n: dig(ports[n], "gamma.mesh.internal", "A")[0] == "NXDOMAIN",
            what=f"gamma gone from {n}",
        )
        for args in (("db.mesh.internal", "A"), ("-x", v4["gamma"]), ("+tcp", "-x", v6["gamma"])):
            assert dig(ports[n], *args) == ("NXDOMAIN", []), (n, args)
        assert not [r for r in zone_rows(cluster, n) if r[2] in (v4["gamma"], v6["gamma"])]
    until(lambda: len({tuple(zone_rows(cluster, n)) for n in rest}) == 1, what="same zones")
    for n in rest:
        assert dig(ports[n], "delta.mesh.internal", "AAAA")[1][0][2] == v6["delta"]
