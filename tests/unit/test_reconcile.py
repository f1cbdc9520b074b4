"""The WireGuard reconciler (meshd.wg.reconcile) against the in-memory backend: diffs,
retries with backoff, key change, removal, stats and observed endpoints, resets."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Sequence

import pytest

from meshd.core.membership import MemberState
from meshd.core.node import Node
from meshd.core.wgplan import (
    AddPeer,
    PeerOp,
    PeerSpec,
    RemovePeer,
    UpdatePeer,
    desired_peers,
    record_wg_endpoint,
)
from meshd.wg import BackendUnavailable, InterfaceConfig, MemoryBackend, select_backend
from meshd.wg.base import WireGuardError
from meshd.wg.reconcile import EndpointObserved, Reconciler

from .test_core_join import addr
from .test_wgplan import _cluster, key, spec

CONFIG = InterfaceConfig(
    name="mem0",
    private_key=bytes(range(32)),
    listen_port=51820,
    ipv4="10.200.0.1",
    ipv6="fd00:200::1",
    cidr4="10.200.0.0/16",
    cidr6="fd00:200::/48",
)


async def until(cond: Callable[[], object], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def fast(
    backend: MemoryBackend, desired: Callable[[], dict[bytes, PeerSpec]], **kw: object
) -> Reconciler:
    opts: dict[str, object] = {
        "interval": 0.05,
        "min_backoff": 0.01,
        "max_backoff": 0.08,
        "debounce": 0.0,
        "rng": random.Random(1),
    }
    opts.update(kw)
    return Reconciler(backend, desired, **opts)  # type: ignore[arg-type]


async def test_one_pass_applies_the_difference_and_a_second_does_nothing() -> None:
    be = MemoryBackend()
    await be.open(CONFIG)
    want = {key(i): spec(i) for i in (1, 2, 3)}
    rec = Reconciler(be, lambda: want)
    ops = await rec.sync()
    assert [type(op) for op in ops] == [AddPeer] * 3
    assert {k: p.spec() for k, p in (await be.peers()).items()} == want
    writes = be.stats.device_writes
    assert await rec.sync() == []
    assert be.stats.device_writes == writes  # nothing written when already right
    assert rec.converged and rec.ops_applied == 3


async def test_diffs_update_and_remove() -> None:
    be = MemoryBackend()
    want = {key(i): spec(i) for i in (1, 2, 3)}
    rec = Reconciler(be, lambda: want)
    await rec.sync()
    want[key(1)] = spec(1, "198.51.100.1:51820")
    del want[key(3)]
    ops = await rec.sync()
    assert ops == [RemovePeer(key(3)), UpdatePeer(key(1), endpoint="198.51.100.1:51820")]
    assert set(await be.peers()) == {key(1), key(2)}
    assert (await be.peers())[key(1)].endpoint == "198.51.100.1:51820"


async def test_key_change_replaces_the_peer() -> None:
    be = MemoryBackend()
    want = {key(1): spec(1)}
    rec = Reconciler(be, lambda: want)
    await rec.sync()
    rekeyed = dataclasses.replace(spec(1), public_key=key(9))
    want.clear()
    want[key(9)] = rekeyed
    ops = await rec.sync()
    assert ops == [RemovePeer(key(1)), AddPeer(rekeyed)]
    peers = await be.peers()
    assert set(peers) == {key(9)} and peers[key(9)].allowed_ips == spec(1).allowed_ips


async def test_trigger_runs_a_pass_in_the_background() -> None:
    be = MemoryBackend()
    want: dict[bytes, PeerSpec] = {}
    rec = fast(be, lambda: want, interval=60.0)
    rec.start()
    try:
        await until(lambda: rec.passes >= 1)
        want[key(4)] = spec(4)
        t0 = time.monotonic()
        rec.trigger()  # returns at once; the pass happens in the reconciler's task
        assert time.monotonic() - t0 < 0.01
        await until(lambda: key(4) in rec.peers)
    finally:
        await rec.stop()
    assert not rec.running


async def test_many_triggers_coalesce() -> None:
    be = MemoryBackend()
    want = {key(1): spec(1)}
    rec = fast(be, lambda: want, interval=60.0, debounce=0.05)
    rec.start()
    try:
        await until(lambda: rec.passes >= 1)
        passes = rec.passes
        for _ in range(200):
            rec.trigger()
        await asyncio.sleep(0.2)
        assert rec.passes - passes <= 2
    finally:
        await rec.stop()


async def test_periodic_pass_repairs_drift_without_a_trigger() -> None:
    be = MemoryBackend()
    want = {key(1): spec(1), key(2): spec(2)}
    rec = fast(be, lambda: want)
    rec.start()
    try:
        await until(lambda: len(rec.peers) == 2)
        await be.apply([RemovePeer(key(2))])  # someone ran `wg set ... remove`
        await until(lambda: key(2) in be._peers)
    finally:
        await rec.stop()


async def test_failures_are_retried_with_exponential_backoff() -> None:
    be = MemoryBackend()
    be.fail_next("apply", 3)
    want = {key(1): spec(1)}
    rec = fast(be, lambda: want, interval=60.0)
    t0 = time.monotonic()
    rec.start()
    try:
        await until(lambda: rec.converged)
    finally:
        await rec.stop()
    assert rec.failed_passes == 3 and rec.failures == 0 and rec.last_error is None
    assert key(1) in be._peers
    # backoffs 0.01, 0.02, 0.04 (x [0.5, 1] jitter) -> at least 0.035 s
    assert time.monotonic() - t0 >= 0.035


async def test_read_failures_are_retried_too() -> None:
    be = MemoryBackend()
    be.fail_next("peers", 2)
    rec = fast(be, lambda: {key(1): spec(1)})
    rec.start()
    try:
        await until(lambda: rec.converged)
    finally:
        await rec.stop()
    assert rec.failed_passes == 2


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    rec = Reconciler(MemoryBackend(), dict, min_backoff=0.5, max_backoff=30.0)
    seen = []
    for failures in range(1, 12):
        rec.failures = failures
        d = rec.backoff()
        base = min(30.0, 0.5 * 2 ** (failures - 1))
        assert base / 2 <= d <= base
        seen.append(base)
    assert seen[:4] == [0.5, 1.0, 2.0, 4.0] and seen[-1] == 30.0


async def test_triggers_wait_out_the_backoff_but_a_reset_cuts_it_short() -> None:
    be = MemoryBackend()
    be.fail_always("apply")
    rec = fast(be, lambda: {key(1): spec(1)}, min_backoff=5.0, max_backoff=5.0)
    rec.start()
    try:
        await until(lambda: rec.failed_passes == 1)
        for _ in range(10):
            rec.trigger()
        await asyncio.sleep(0.1)
        assert rec.failed_passes == 1  # no hammering during the backoff
        be.fail_always("apply", on=False)
        be.wipe()  # e.g. wireguard-go restarted: resync now
        await until(lambda: rec.converged, within=1.0)
    finally:
        await rec.stop()


class _Ignoring(MemoryBackend):
    """Accepts changes and silently does nothing (a device that lies)."""

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        self.calls.append("apply")


async def test_a_change_that_does_not_stick_is_a_failure() -> None:
    rec = Reconciler(_Ignoring(), lambda: {key(1): spec(1)})
    with pytest.raises(WireGuardError, match="did not take effect"):
        await rec.sync()
    assert not rec.converged


async def test_stats_connection_and_observed_endpoints() -> None:
    be = MemoryBackend()
    seen: list[EndpointObserved] = []
    now = [1_790_000_000.0]
    want = {key(1): spec(1), key(2): spec(2)}
    rec = Reconciler(be, lambda: want, clock=lambda: now[0], on_endpoint=seen.append)
    await rec.sync()
    assert rec.connection(key(1)) == "unreachable"
    assert rec.connection(key(3)) is None
    be.observe(key(1), endpoint="203.0.113.5:40001", handshake=now[0] - 1, rx=1000, tx=2000)
    await rec.sync()
    st = rec.peers[key(1)]
    assert (st.rx_bytes, st.tx_bytes, st.endpoint) == (1000, 2000, "203.0.113.5:40001")
    assert rec.connection(key(1)) == "direct"
    assert seen == [EndpointObserved(key(1), None, "203.0.113.5:40001", now[0] - 1)]
    await rec.sync()
    assert len(seen) == 1  # reported once per change, not per pass
    now[0] += 200  # handshake stale: unreachable, and the advertised endpoint is put back
    ops = await rec.sync()
    assert rec.connection(key(1)) == "unreachable"
    assert ops == [UpdatePeer(key(1), endpoint=spec(1).endpoint)]


async def test_a_broken_endpoint_listener_does_not_stop_reconciliation() -> None:
    be = MemoryBackend()

    def boom(_: EndpointObserved) -> None:
        raise RuntimeError("listener bug")

    rec = Reconciler(be, lambda: {key(1): spec(1)}, on_endpoint=boom)
    await rec.sync()
    be.observe(key(1), endpoint="203.0.113.5:1", handshake=time.time())
    await rec.sync()
    assert rec.converged


async def test_memory_configure_is_idempotent() -> None:
    be = MemoryBackend()
    await be.open(CONFIG)
    writes = be.stats.writes
    assert await be.configure(CONFIG) == 0
    assert be.stats.writes == writes
    assert await be.configure(dataclasses.replace(CONFIG, mtu=1380)) == 1
    assert await be.public_key() is not None


async def test_select_backend_memory_none_and_unknown() -> None:
    assert isinstance(await select_backend("memory", "mem1"), MemoryBackend)
    assert await select_backend("none", "mem1") is None
    with pytest.raises(BackendUnavailable, match="unknown"):
        await select_backend("bogus", "mem1")


async def test_select_backend_auto_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshd.wg import kernel, userspace

    async def no_kernel(netns: str | None = None) -> tuple[bool, str]:
        return False, "the kernel has no WireGuard module (errno 95 creating a link)"

    monkeypatch.setattr(kernel, "kernel_support", no_kernel)
    monkeypatch.setattr(userspace, "find_binary", lambda binary="wireguard-go": None)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    with pytest.raises(BackendUnavailable) as exc:
        await select_backend("auto", "mesh0")
    assert "WireGuard module" in str(exc.value) and "wireguard-go" in str(exc.value)
    with pytest.raises(BackendUnavailable, match="kernel WireGuard backend"):
        await select_backend("kernel", "mesh0")
    monkeypatch.setattr(userspace, "find_binary", lambda binary="wireguard-go": "/usr/bin/x")
    be = await select_backend("auto", "mesh0")
    assert be is not None and be.kind == "userspace"


# ------------------------------------------------------------ fed by real node cores


async def test_memory_mesh_follows_membership() -> None:
    """Three real cores on the fake network, one reconciler each: every node has the
    other two as peers; a crashed member's peer goes once it is declared dead."""
    net, nodes = _cluster(3)

    def desired_of(viewer: Node) -> Callable[[], dict[bytes, PeerSpec]]:
        def state_of(nid: bytes) -> MemberState | None:
            s = viewer.member_state(nid)
            return None if s is None else s[0]

        return lambda: (
            desired_peers(
                viewer.store,
                state_of,
                viewer.plan,
                self_id=viewer.sign.node_id,
                self_key=viewer.wg.public,
                endpoint=record_wg_endpoint,
            ).peers
        )

    recs = {n.sign.node_id: Reconciler(MemoryBackend(), desired_of(n)) for n in nodes}
    for r in recs.values():
        await r.sync()
    for n in nodes:
        assert set(recs[n.sign.node_id].peers) == {m.wg.public for m in nodes if m is not n}
    del net.nodes[addr(3)]  # crash the third
    net.advance(60.0)
    for n in nodes[:2]:
        await recs[n.sign.node_id].sync()
        other = nodes[1] if n is nodes[0] else nodes[0]
        assert set(recs[n.sign.node_id].peers) == {other.wg.public}
