"""Real `meshd` processes on loopback: init, joins through several seeds, bad tokens, restarts.

Every process is started through ``LocalCluster`` (tracked by PID, stopped in the
fixture's teardown); all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from meshd.demo import LocalCluster, free_port

pytestmark = pytest.mark.integration


def our_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def status(c: LocalCluster, name: str) -> dict[str, object]:
    return c.get(name, "/v1/status")  # type: ignore[no-any-return]


def started_leader(c: LocalCluster) -> None:
    res = c.init("leader")
    assert res.returncode == 0, res.stderr
    assert "ipv4  10.200.0.1" in res.stdout
    c.start("leader")


def test_init_and_joins_through_leader_and_non_leader_seeds(cluster: LocalCluster) -> None:
    started_leader(cluster)
    plan = [("n2", "leader"), ("n3", "n2"), ("n4", "n3")]
    for name, seed in plan:
        res = cluster.join(name, seed, cluster.token("leader"))
        assert res.returncode == 0, f"{name}: {res.stderr}"
        assert f"joined through 127.0.0.1:{cluster.udp[seed]}" in res.stdout
        cluster.start(name)
    names = ["leader", "n2", "n3", "n4"]
    cluster.wait_converged(names)
    v4s, v6s = set(), set()
    for n in names:
        st = status(cluster, n)
        addrs = st["addresses"]
        assert isinstance(addrs, dict)
        v4, v6 = IPv4Address(addrs["ipv4"]), IPv6Address(addrs["ipv6"])
        assert v4 in IPv4Network("10.200.0.0/16") and v6 in IPv6Network("fd00:200::/48")
        v4s.add(v4)
        v6s.add(v6)
        assert st["member_count"] == 4
        assert st["is_leader"] == (n == "leader")
    assert len(v4s) == 4 and len(v6s) == 4
    # n3 was admitted by n2, which had to lease its own block from the leader first
    members = {m["name"]: m for m in cluster.get("leader", "/v1/members")["members"]}
    assert members["n3"]["admitted_by"] == members["n2"]["id"]
    leases = cluster.get("n4", "/v1/leases")["leases"]
    assert {lease["holder_name"] for lease in leases} >= {"leader", "n2"}
    # the CLI reads the running agent through its run file
    out = cluster.meshd("status", "--data-dir", str(cluster.datadir("n3")))
    assert out.returncode == 0, out.stderr
    assert "node       n3" in out.stdout and "members    4" in out.stdout
    out = cluster.meshd("peers", "--data-dir", str(cluster.datadir("n3")), "--json")
    assert out.returncode == 0, out.stderr
    assert {m["name"] for m in json.loads(out.stdout)} == set(names)


def test_bad_tokens_fail_clearly_and_leave_no_state(cluster: LocalCluster, tmp_path: Path) -> None:
    started_leader(cluster)
    other = LocalCluster(tmp_path / "other")
    (tmp_path / "other").mkdir()
    assert other.init("foreign").returncode == 0
    cases = {
        "wrong": (other.token("foreign"), "rejected the join token"),
        "garbage": ("meshd1.not-a-token.x", "join token is malformed"),
        "expired": (cluster.token("leader", "--ttl", "1s"), "expired"),
    }
    once = cluster.token("leader", "--uses", "1")
    ok = cluster.join("first", "leader", once)
    assert ok.returncode == 0, ok.stderr
    cases["used-up"] = (once, "used up")
    time.sleep(1.2)  # let the 1 s token expire
    for label, (tok, message) in cases.items():
        res = cluster.join(f"x-{label}", "leader", tok)
        assert res.returncode == 1, (label, res.stdout)
        assert message in res.stderr, (label, res.stderr)
        assert res.stderr.startswith("meshd: error: ")
        assert len(res.stderr.strip().splitlines()) == 1
        assert our_files(cluster.datadir(f"x-{label}")) == [], label


def test_unreachable_seed_and_bad_options(cluster: LocalCluster, tmp_path: Path) -> None:
    started_leader(cluster)
    tok = cluster.token("leader")
    dead = free_port()
    d = tmp_path / "lonely"
    res = cluster.meshd(
        "join", "--data-dir", str(d), "--name", "lonely", "--listen", f"127.0.0.1:{free_port()}",
        "--seed", f"127.0.0.1:{dead}", "--token", tok, "--timeout", "2s",
    )  # fmt: skip
    assert res.returncode == 1
    assert "no seed answered" in res.stderr and f"127.0.0.1:{dead}" in res.stderr
    assert our_files(d) == []
    for args, message in [
        (["--cidr", "10.9.0.0/31"], "no room for a mesh"),
        (["--cidr", "10.9.0.1/16"], "host bits"),
        (["--cidr", "127.0.0.0/16"], "loopback"),
        (["--cidr6", "fd00::/120"], "too small to mirror"),
        (["--name", "Not A Label!"], "DNS label"),
        (["--listen", "127.0.0.1:99999"], "invalid port"),
    ]:
        bad = tmp_path / "bad"
        res = cluster.meshd("init", "--data-dir", str(bad), *args)
        assert res.returncode == 1, args
        assert message in res.stderr, (args, res.stderr)
        assert our_files(bad) == [], args
    res = cluster.init("leader")  # already initialised
    assert res.returncode == 1 and "already initialised" in res.stderr


def test_restart_keeps_identity_and_addresses(cluster: LocalCluster) -> None:
    started_leader(cluster)
    assert cluster.join("n2", "leader", cluster.token("leader")).returncode == 0
    cluster.start("n2")
    before = status(cluster, "n2")
    key_before = (cluster.datadir("n2") / "node.key").read_bytes()
    assert cluster.stop("n2") == 0  # SIGTERM: clean exit
    assert not (cluster.datadir("n2") / "run.json").exists()
    cluster.start("n2")
    after = status(cluster, "n2")
    for field in ("node_id", "name", "addresses", "cluster_id", "leader_id"):
        assert after[field] == before[field], field
    assert (cluster.datadir("n2") / "node.key").read_bytes() == key_before
    # the leader restarts too and keeps every allocation
    assert cluster.stop("leader", signal.SIGKILL) == -signal.SIGKILL
    cluster.start("leader")
    assert status(cluster, "leader")["addresses"] == {"ipv4": "10.200.0.1", "ipv6": "fd00:200::1"}
    res = cluster.join("n3", "leader", cluster.token("leader"))
    assert res.returncode == 0, res.stderr
    assert "ipv4  10.200.0.3" in res.stdout  # .2 is still n2's


def test_key_and_state_files(cluster: LocalCluster) -> None:
    started_leader(cluster)
    d = cluster.datadir("leader")
    for key in ("node", "wg", "ca", "keyring", "token", "http"):
        mode = (d / f"{key}.key").stat().st_mode & 0o777
        assert mode == 0o600, (key, oct(mode))
    state = json.loads((d / "state.json").read_text())
    assert state["schema"] == "meshd.state" and state["version"] == 1
    text = (d / "state.json").read_text()
    for key in ("node", "wg", "ca", "token"):  # no secret leaks into the state file
        secret = bytes.fromhex(_key_hex(d / f"{key}.key"))
        assert secret.hex() not in text


def _key_hex(path: Path) -> str:
    import base64

    return base64.b64decode(path.read_text().strip()).hex()


def test_run_refuses_corrupt_or_missing_state(cluster: LocalCluster, tmp_path: Path) -> None:
    res = cluster.meshd("run", "--data-dir", str(tmp_path / "nothing"), "--http", "off")
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert cluster.init("leader").returncode == 0
    state = cluster.datadir("leader") / "state.json"
    for garbage in (b"{not json", b'{"schema": "other", "version": 1}', b"[]"):
        state.write_bytes(garbage)
        res = cluster.meshd("run", "--data-dir", str(cluster.datadir("leader")), "--http", "off")
        assert res.returncode == 1
        assert str(state) in res.stderr, res.stderr
        assert state.read_bytes() == garbage  # never replaced


def test_leave_releases_and_stops(cluster: LocalCluster) -> None:
    started_leader(cluster)
    assert cluster.join("n2", "leader", cluster.token("leader")).returncode == 0
    cluster.start("n2")
    res = cluster.meshd("leave", "--data-dir", str(cluster.datadir("n2")))
    assert res.returncode == 0, res.stderr
    assert "left the cluster" in res.stdout
    proc = cluster.procs["n2"]
    proc.wait(10)
    assert proc.returncode == 0
    states = {m["name"]: m["state"] for m in cluster.get("leader", "/v1/members")["members"]}
    assert states == {"leader": "alive", "n2": "left"}
    # the leader freed n2's address: the next joiner gets it
    res = cluster.join("n3", "leader", cluster.token("leader"))
    assert res.returncode == 0, res.stderr
    assert "ipv4  10.200.0.2" in res.stdout
    res = cluster.meshd("run", "--data-dir", str(cluster.datadir("n2")), "--http", "off")
    assert res.returncode == 1 and "left the cluster" in res.stderr
    # the leader itself refuses while members exist
    res = cluster.meshd("leave", "--data-dir", str(cluster.datadir("leader")))
    assert res.returncode == 1 and "cannot leave" in res.stderr


def test_env_and_config_file(cluster: LocalCluster, tmp_path: Path) -> None:
    cfg = tmp_path / "meshd.toml"
    port = free_port()
    cfg.write_text(f'name = "fromfile"\nlisten = "127.0.0.1:{port}"\ncidr = "10.77.0.0/16"\n')
    env = {**os.environ, "MESHD_NAME": "fromenv"}
    d = tmp_path / "cfg"
    res = subprocess.run(
        [sys.executable, "-m", "meshd", "init", "--data-dir", str(d), "--config", str(cfg)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "name  fromenv" in res.stdout  # env beats file
    assert "ipv4  10.77.0.1" in res.stdout  # file beats default
    res = subprocess.run(
        [sys.executable, "-m", "meshd", "init", "--data-dir", str(tmp_path / "c2"),
         "--config", str(cfg), "--name", "fromflag", "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0 and "name  fromflag" in res.stdout  # flag beats env


def test_up_joins_once_then_just_runs(cluster: LocalCluster, tmp_path: Path) -> None:
    started_leader(cluster)
    tok = cluster.token("leader")
    d, port, http = tmp_path / "up", free_port(), free_port(socket.SOCK_STREAM)
    args = [
        sys.executable, "-m", "meshd", "up", "--data-dir", str(d), "--name", "upnode",
        "--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http}",
        "--seed", f"127.0.0.1:{cluster.udp['leader']}", "--token", tok, "--wg-backend", "none",
    ]  # fmt: skip
    for attempt in range(2):  # the second `up` must not try to join again
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            cluster.procs["upnode"] = proc
            cluster.http["upnode"] = http
            cluster.wait_http("upnode")
            st = status(cluster, "upnode")
            assert st["addresses"] == {"ipv4": "10.200.0.2", "ipv6": "fd00:200::2"}, attempt
        finally:
            assert cluster.stop("upnode") == 0
    cluster.wait_converged(["leader"])
    names = {m["name"] for m in cluster.get("leader", "/v1/members")["members"]}
    assert names == {"leader", "upnode"}


def post(c: LocalCluster, name: str, path: str, body: bytes, token: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{c.http[name]}{path}", data=body,
                                 method="POST")  # fmt: skip
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_hostname_change_spreads_to_every_member(cluster: LocalCluster) -> None:
    started_leader(cluster)
    for name in ("n2", "n3"):
        assert cluster.join(name, "leader", cluster.token("leader")).returncode == 0
        cluster.start(name)
    cluster.wait_converged(["leader", "n2", "n3"])
    token = (cluster.datadir("n3") / "http.key").read_text().strip()
    raw = base64.b64decode(token).hex()
    body = json.dumps({"hostname": "DB.Example."}).encode()
    assert post(cluster, "n3", "/v1/record", body, None)[0] == 401
    assert post(cluster, "n3", "/v1/record", b"{", raw)[0] == 400
    code, answer = post(cluster, "n3", "/v1/record", b'{"hostname": "bad name"}', raw)
    assert code == 400 and "not a valid DNS name" in answer["error"]
    code, answer = post(cluster, "n3", "/v1/record", body, raw)
    assert code == 200 and answer["hostname"] == "db.example"
    deadline = time.monotonic() + 10
    seen: dict[str, object] = {}
    while time.monotonic() < deadline:
        for viewer in ("leader", "n2"):
            members = cluster.get(viewer, "/v1/members")["members"]
            seen[viewer] = next(m["hostname"] for m in members if m["name"] == "n3")
        if all(v == "db.example" for v in seen.values()):
            break
        time.sleep(0.05)
    assert seen == {"leader": "db.example", "n2": "db.example"}
