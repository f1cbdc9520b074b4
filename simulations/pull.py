"""The node's record pull, as the simulator runs it for every simulated node.

``meshd.core.node.Node`` spreads a record as a ~30-byte announcement and a member that
lacks that version pulls it (``rq``, answered by a ``push``). That bookkeeping lives in
``Node`` (``_want``, ``_retry_wanted``, the ``SyncNeeded`` and ``v`` branches of
``_swim_events`` / ``_on_item``, the ``_wanted`` check in ``_offer_record``) next to the
record store and the signatures, which 10,000 simulated nodes cannot afford. This is
the same rule, step for step and with the node's own constants, over a plain
"version held" lookup: ask the announcer at most once per ``RECORD_WANT_RETRY`` per
version; ask it again every ``RECORD_WANT_RETRY`` while the record has not come, up
to ``RECORD_WANT_TRIES`` requests; batch requests per member, at most
``MAX_RECORD_REQUEST`` ids a datagram. Keep it in step with ``Node``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from meshd.core.node import MAX_RECORD_REQUEST, MAX_WANTED, RECORD_WANT_RETRY, RECORD_WANT_TRIES
from meshd.core.wire import Addr


def announcement(node_id: bytes, seq: int) -> tuple[dict[str, Any], bytes]:
    """``Node._broadcast_record``'s item and queue key."""
    return {"k": "v", "id": node_id, "s": seq}, b"r" + node_id


class RecordPull:
    """One node's wanted records (``Node._wanted``) and pending requests."""

    __slots__ = ("_batch", "_wanted")

    def __init__(self) -> None:
        #: node id -> (seq wanted, when asked, whom, requests so far), oldest first.
        self._wanted: OrderedDict[bytes, tuple[int, float, Addr, int]] = OrderedDict()
        self._batch: dict[Addr, list[bytes]] = {}

    def want(self, nid: bytes, seq: int, addr: Addr, now: float, tries: int = 1) -> None:
        """``Node._want``."""
        prev = self._wanted.get(nid)
        if prev is not None and prev[0] >= seq and now - prev[1] < RECORD_WANT_RETRY:
            return
        self._wanted[nid] = (max(seq, prev[0]) if prev else seq, now, addr, tries)
        self._wanted.move_to_end(nid)
        if len(self._wanted) > MAX_WANTED:
            self._wanted.popitem(last=False)
        self._batch.setdefault(addr, []).append(nid)

    def sync_needed(
        self, addr: Addr, ids: Iterable[bytes], have: Callable[[bytes], int], now: float
    ) -> None:
        """``Node._swim_events`` on ``SyncNeeded``: one seq beyond what we hold."""
        for nid in ids:
            self.want(nid, have(nid) + 1, addr, now)

    def got(self, nid: bytes, seq: int) -> None:
        """``Node._offer_record``: a new version arrived."""
        w = self._wanted.get(nid)
        if w is not None and w[0] <= seq:
            del self._wanted[nid]

    def next_retry(self) -> float | None:
        """``Node.get_timer``'s pull term."""
        if not self._wanted:
            return None
        return next(iter(self._wanted.values()))[1] + RECORD_WANT_RETRY

    def retry(self, now: float, have: Callable[[bytes], int]) -> None:
        """``Node._retry_wanted``."""
        wanted = self._wanted
        while wanted:
            nid, (seq, asked, addr, tries) = next(iter(wanted.items()))
            if asked + RECORD_WANT_RETRY > now:
                break
            del wanted[nid]
            if tries < RECORD_WANT_TRIES and have(nid) < seq:
                self.want(nid, seq, addr, now, tries + 1)

    def requests(self) -> list[tuple[Addr, list[bytes]]]:
        """The ``rq`` datagrams to send now (``Node._swim_events``'s flush)."""
        if not self._batch:
            return []
        out = [
            (addr, ids[i : i + MAX_RECORD_REQUEST])
            for addr, ids in self._batch.items()
            for i in range(0, len(ids), MAX_RECORD_REQUEST)
        ]
        self._batch.clear()
        return out
