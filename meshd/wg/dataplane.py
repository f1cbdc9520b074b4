"""The agent's WireGuard data plane: one backend, one reconciler, fed by the node's view.

The agent builds a :class:`DataPlane` with a backend from
:func:`meshd.wg.select_backend`, calls :meth:`DataPlane.start` before anything binds to
the overlay addresses, :meth:`DataPlane.trigger` on every membership or record change,
and :meth:`DataPlane.stop` on shutdown (interface removed, wireguard-go stopped). It
never blocks the gossip loop: the reconciler runs in its own task.

One interface is managed by one agent: an exclusive lock on
``/run/meshd/IFNAME.lock`` (like the UAPI socket directory, shared by every network
namespace) refuses a second agent that was given the same interface name, instead of
letting two agents fight over one device. The kernel drops the lock when an agent
dies, so a restarted agent adopts the interface its predecessor left running.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from typing import Any

import structlog

from meshd.core.membership import MemberState
from meshd.core.node import Node
from meshd.core.records import PeerRecord
from meshd.core.wgplan import Desired, desired_peers
from meshd.wg.base import DEFAULT_MTU, InterfaceConfig, WireGuardBackend, WireGuardError
from meshd.wg.reconcile import Reconciler

log = structlog.get_logger("meshd.wg")

LOCK_DIR = "/run/meshd"


class InterfaceLock:
    def __init__(self, interface: str, lock_dir: str = LOCK_DIR) -> None:
        self.path = os.path.join(lock_dir, f"{interface}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise WireGuardError(
                f"interface {os.path.basename(self.path)[:-5]} is managed by another meshd "
                f"(pid {holder}, lock {self.path}); give each agent its own --interface"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class DataPlane:
    def __init__(
        self,
        backend: WireGuardBackend,
        node: Node,
        *,
        wg_port: int,
        mtu: int = DEFAULT_MTU,
        interval: float = 5.0,
        clock: Callable[[], float] = time.time,
        lock: bool = True,
    ) -> None:
        self.backend = backend
        self.node = node
        self.wg_port = wg_port
        self.mtu = mtu
        self.clock = clock
        self._lock = InterfaceLock(backend.interface) if lock else None
        self.conflicts: dict[bytes, str] = {}
        #: Called after tunnel stats went into the core (the agent sends what follows).
        self.after_report: Callable[[], None] | None = None
        self.reconciler = Reconciler(
            backend, self.desired, interval=interval, clock=clock, on_sync=self.report
        )
        self.started = False

    def interface_config(self) -> InterfaceConfig:
        v4, v6 = self.node.addresses()
        return InterfaceConfig(
            name=self.backend.interface,
            private_key=self.node.wg.private,
            listen_port=self.wg_port,
            ipv4=v4,
            ipv6=v6,
            cidr4=str(self.node.plan.cidr4),
            cidr6=str(self.node.plan.cidr6),
            mtu=self.mtu,
        )

    def _state(self, nid: bytes) -> MemberState | None:
        st = self.node.member_state(nid)
        return None if st is None else st[0]

    def desired(self) -> Desired:
        node = self.node
        d = desired_peers(
            node.store,
            self._state,
            node.plan,
            self_id=node.sign.node_id,
            self_key=node.wg.public,
        )
        for nid, why in d.conflicts.items():
            if self.conflicts.get(nid) != why:
                log.warning("member left out of wireguard", id=nid.hex(), reason=why)
        self.conflicts = d.conflicts
        return d

    def report(self) -> None:
        """Feed every peer's read-back (endpoint seen from, last handshake) to the core:
        the observed endpoint is kept there, and the handshake decides whether gossip to
        that member may take its tunnel (meshd/core/paths.py)."""
        now = self.clock()
        for key, st in self.reconciler.peers.items():
            nid = self.reconciler.owners.get(key)
            if nid is None:
                continue
            if self.node.tunnel_report(nid, st.endpoint, st.last_handshake, now):
                log.info("wireguard peer seen", id=nid.hex(), endpoint=st.endpoint)
        if self.after_report is not None:
            self.after_report()

    # ---------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create (or adopt) and configure the interface, then start reconciling."""
        if self._lock is not None:
            self._lock.acquire()
        try:
            await self.backend.open(self.interface_config())
        except BaseException:
            await self.backend.close()
            if self._lock is not None:
                self._lock.release()
            raise
        self.reconciler.start()
        self.started = True
        log.info("wireguard up", **self.backend.describe())

    def trigger(self) -> None:
        if self.started:
            self.reconciler.trigger()

    async def stop(self) -> None:
        self.started = False
        await self.reconciler.stop()
        try:
            await self.backend.close()
        finally:
            if self._lock is not None:
                self._lock.release()
        log.info("wireguard down", interface=self.backend.interface)

    # -------------------------------------------------------------------------- views

    def describe(self) -> dict[str, Any]:
        return {
            **self.backend.describe(),
            "listen_port": self.wg_port,
            "mtu": self.mtu,
            "reconciler": self.reconciler.describe(),
            "stats": {
                "device_writes": self.backend.stats.device_writes,
                "link_writes": self.backend.stats.link_writes,
                "peer_ops": self.backend.stats.peer_ops,
                "restarts": self.backend.stats.restarts,
            },
        }

    def member_fields(self, rec: PeerRecord) -> dict[str, Any]:
        """What /v1/members shows about a member's tunnel."""
        if rec.node_id == self.node.sign.node_id:
            return {"connection": "self", "last_handshake": None}
        st = self.reconciler.peers.get(rec.wg_key)
        if st is None:
            return {"connection": None, "last_handshake": None, "wg_endpoint": None}
        return {
            "connection": self.reconciler.connection(rec.wg_key),
            "last_handshake": st.last_handshake,
            "wg_endpoint": st.endpoint,
            "rx_bytes": st.rx_bytes,
            "tx_bytes": st.tx_bytes,
        }
