"""In-process WireGuard backend: no interface, no privileges. For tests, the simulator
and agents on loopback.

It follows WireGuard's semantics where the reconciler can tell the difference
(allowed IPs unique across peers, update-only on a vanished peer is a no-op, counters
survive updates) through :func:`meshd.core.wgplan.apply_ops`. Tests drive it with
:meth:`MemoryBackend.fail_next` (refuse the next calls), :meth:`MemoryBackend.observe`
(a handshake from some endpoint with traffic) and :meth:`MemoryBackend.wipe` (what a
crashed and restarted wireguard-go looks like).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from meshd.core.crypto import WireGuardKey
from meshd.core.wgplan import PeerOp, PeerStatus, apply_ops
from meshd.wg.base import InterfaceConfig, WireGuardBackend, WireGuardError


class MemoryBackend(WireGuardBackend):
    kind = "memory"

    def __init__(self, interface: str = "mem0") -> None:
        super().__init__(interface)
        self.config: InterfaceConfig | None = None
        self._peers: dict[bytes, PeerStatus] = {}
        self._fail: list[str] = []  # method names that fail next, in order
        self._fail_all: set[str] = set()
        self.closed = False
        self.calls: list[str] = []

    # ------------------------------------------------------------------ fault injection

    def fail_next(self, method: str = "apply", times: int = 1) -> None:
        """The next ``times`` calls of ``method`` ("apply", "peers", "configure") fail."""
        self._fail.extend([method] * times)

    def fail_always(self, method: str, on: bool = True) -> None:
        (self._fail_all.add if on else self._fail_all.discard)(method)

    def _maybe_fail(self, method: str) -> None:
        self.calls.append(method)
        if method in self._fail_all:
            self.stats.errors += 1
            raise WireGuardError(f"injected failure of {method}")
        if method in self._fail:
            self._fail.remove(method)
            self.stats.errors += 1
            raise WireGuardError(f"injected failure of {method}")

    def observe(
        self,
        public_key: bytes,
        *,
        endpoint: str | None = None,
        handshake: float | None = None,
        rx: int = 0,
        tx: int = 0,
    ) -> None:
        """Pretend the peer handshook (at ``handshake``) from ``endpoint`` and moved bytes."""
        st = self._peers[public_key]
        self._peers[public_key] = dataclasses.replace(
            st,
            endpoint=endpoint if endpoint is not None else st.endpoint,
            last_handshake=handshake if handshake is not None else st.last_handshake,
            rx_bytes=st.rx_bytes + rx,
            tx_bytes=st.tx_bytes + tx,
        )

    def wipe(self) -> None:
        """Lose every peer, as a restarted userspace daemon does, and tell the listeners."""
        self._peers.clear()
        self.stats.restarts += 1
        self._reset()

    # ------------------------------------------------------------------------ backend

    async def open(self, config: InterfaceConfig) -> None:
        self.closed = False
        await self.configure(config)

    async def configure(self, config: InterfaceConfig) -> int:
        self._maybe_fail("configure")
        if config == self.config:
            return 0
        old, self.config = self.config, config
        writes = 1 if old is None or old.private_key != config.private_key else 0
        writes += 1 if old is None or old.listen_port != config.listen_port else 0
        link = (config.mtu, config.ipv4, config.ipv6, config.routes)
        if old is None or (old.mtu, old.ipv4, old.ipv6, old.routes) != link:
            writes += 1
            self.stats.link_writes += 1
        self.stats.device_writes += writes
        return writes

    async def peers(self) -> dict[bytes, PeerStatus]:
        self._maybe_fail("peers")
        return dict(self._peers)

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        self._maybe_fail("apply")
        if not ops:
            return
        self._peers = apply_ops(self._peers, ops)
        self.stats.device_writes += 1
        self.stats.peer_ops += len(ops)

    async def public_key(self) -> bytes | None:
        if self.config is None:
            return None
        return WireGuardKey(self.config.private_key).public

    async def close(self) -> None:
        self.closed = True
        self._peers.clear()
        self.config = None
