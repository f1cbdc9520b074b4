"""The WireGuard peer reconciler: level-triggered, idempotent, never in the caller's way.

Like a Kubernetes controller, each pass reads what the device has, asks the membership
view what it should have (:func:`meshd.core.wgplan.desired_peers`, through the
``desired`` callable, so a pass always sees the latest view), applies only the
difference (:func:`meshd.core.wgplan.plan_peers`) and reads back to confirm. Passes run
on :meth:`Reconciler.trigger` (coalesced: a burst of gossip events is one pass) and
every ``interval`` seconds, which also refreshes the per-peer stats.

A failed pass (the device refused, wireguard-go is restarting) is retried after an
exponential backoff with jitter, ``min_backoff`` doubling to ``max_backoff``; triggers
during the backoff wait for it, so a failing backend is not hammered by gossip. A
backend reset (``on_reset``: a restarted wireguard-go lost every peer) ends the backoff
at once.

The reconciler also reports the endpoint each peer is actually seen from (the endpoint
WireGuard holds after a handshake, which behind a NAT is the mapped address) through
``on_endpoint``; the agent feeds those to the core as candidates for NAT traversal.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from meshd.core.wgplan import ROAM_GRACE, Desired, PeerOp, PeerSpec, PeerStatus, plan_peers
from meshd.wg.base import WireGuardBackend, WireGuardError, cancel_and_wait

log = structlog.get_logger("meshd.wg")

INTERVAL = 10.0
MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
DEBOUNCE = 0.02
#: Delay of the extra pass after one that changed something (fresh stats for new peers).
FOLLOW_UP = 0.5


@dataclass(frozen=True)
class EndpointObserved:
    """Peer ``public_key`` (member ``node_id``, if known) completed a handshake and is
    reached at ``endpoint``."""

    public_key: bytes
    node_id: bytes | None
    endpoint: str
    last_handshake: float


class Reconciler:
    def __init__(
        self,
        backend: WireGuardBackend,
        desired: Callable[[], Desired | Mapping[bytes, PeerSpec]],
        *,
        interval: float = INTERVAL,
        min_backoff: float = MIN_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        debounce: float = DEBOUNCE,
        roam_grace: float = ROAM_GRACE,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_endpoint: Callable[[EndpointObserved], None] | None = None,
        on_sync: Callable[[], None] | None = None,
    ) -> None:
        self.backend = backend
        self._desired = desired
        self.interval = interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.debounce = debounce
        self.roam_grace = roam_grace
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_endpoint = on_endpoint
        #: Called after every successful pass (fresh ``peers`` and ``owners``).
        self.on_sync = on_sync
        #: Latest read-back, by public key.
        self.peers: dict[bytes, PeerStatus] = {}
        #: public key -> node id, from the latest desired view.
        self.owners: dict[bytes, bytes] = {}
        self.observed: dict[bytes, str] = {}
        self.failures = 0  # consecutive
        self.last_error: str | None = None
        self.passes = 0
        self.failed_passes = 0
        self.ops_applied = 0
        self.last_sync: float | None = None
        self.converged = False
        self._wake = asyncio.Event()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        backend.on_reset.append(self.reset)

    # ------------------------------------------------------------------------ control

    def trigger(self) -> None:
        """Ask for a pass soon. Never blocks; many triggers make one pass."""
        self._wake.set()

    def reset(self) -> None:
        """The device lost its state: forget the backoff and resync now."""
        self.failures = 0
        self._kick.set()
        self._wake.set()

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="wg-reconciler")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        with contextlib.suppress(ValueError):
            self.backend.on_reset.remove(self.reset)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -------------------------------------------------------------------------- views

    def connection(self, public_key: bytes) -> str | None:
        """ "direct" while the peer's last handshake is fresh, "unreachable" when it has
        none or a stale one, None when the device has no such peer."""
        st = self.peers.get(public_key)
        if st is None:
            return None
        if st.last_handshake is not None and self.clock() - st.last_handshake < self.roam_grace:
            return "direct"
        return "unreachable"

    def describe(self) -> dict[str, object]:
        return {
            "peers": len(self.peers),
            "converged": self.converged,
            "passes": self.passes,
            "failed_passes": self.failed_passes,
            "ops_applied": self.ops_applied,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_sync": self.last_sync,
        }

    # --------------------------------------------------------------------------- pass

    async def sync(self) -> list[PeerOp]:
        """One pass: read, plan, apply, confirm. Raises on failure (the loop retries)."""
        want = self._desired()
        if isinstance(want, Desired):
            desired, owners = want.peers, want.owners
        else:
            desired, owners = dict(want), {}
        actual = await self.backend.peers()
        ops = plan_peers(desired, actual, self.clock(), roam_grace=self.roam_grace)
        if ops:
            await self.backend.apply(ops)
            self.ops_applied += len(ops)
            actual = await self.backend.peers()
            left = plan_peers(desired, actual, self.clock(), roam_grace=self.roam_grace)
            if left:
                self.converged = False
                raise WireGuardError(f"{len(left)} peer change(s) did not take effect")
        self.owners = owners
        self._read_back(actual)
        self.converged = True
        self.last_sync = self.clock()
        if self.on_sync is not None:
            try:
                self.on_sync()
            except Exception:  # a broken listener must not stop reconciliation
                log.exception("sync listener failed")
        return ops

    def _read_back(self, actual: dict[bytes, PeerStatus]) -> None:
        self.peers = actual
        now = self.clock()
        for key in [k for k in self.observed if k not in actual]:
            del self.observed[key]
        for key, st in actual.items():
            if st.endpoint is None or st.last_handshake is None:
                continue
            if now - st.last_handshake >= self.roam_grace or self.observed.get(key) == st.endpoint:
                continue
            self.observed[key] = st.endpoint
            if self.on_endpoint is not None:
                try:
                    self.on_endpoint(
                        EndpointObserved(key, self.owners.get(key), st.endpoint, st.last_handshake)
                    )
                except Exception:  # a broken listener must not stop reconciliation
                    log.exception("endpoint listener failed")

    def backoff(self) -> float:
        """Delay before the next try after ``failures`` consecutive failures, with
        jitter in [50 %, 100 %] so that many nodes do not retry in lockstep."""
        base = min(self.max_backoff, self.min_backoff * 2.0 ** max(0, self.failures - 1))
        return base * (0.5 + 0.5 * self.rng.random())

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self._kick.clear()
            self.passes += 1
            try:
                ops = await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.failed_passes += 1
                self.last_error = str(exc) or type(exc).__name__
                self.converged = False
                delay = self.backoff()
                log.warning(
                    "wireguard reconcile failed; retrying",
                    error=self.last_error,
                    failures=self.failures,
                    retry_in=round(delay, 3),
                )
                # Triggers wait out the backoff; only a backend reset cuts it short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._kick.wait()
                continue
            if self.failures:
                log.info("wireguard reconcile recovered", after_failures=self.failures)
            self.failures = 0
            self.last_error = None
            if ops:
                log.info(
                    "wireguard peers reconciled",
                    changes=len(ops),
                    peers=len(self.peers),
                    kinds=sorted({type(op).__name__ for op in ops}),
                )
            # Right after a change, look again soon: new peers handshake within
            # milliseconds and the stats should say so without waiting a full interval.
            wait = min(self.interval, FOLLOW_UP) if ops else self.interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            if self.debounce > 0:
                await asyncio.sleep(self.debounce)  # coalesce a burst of triggers
