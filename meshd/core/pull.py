"""Record pulls: which members' records this node has asked for, and when to ask again.

A record spreads as a ~30-byte announcement (``{"k": "v", "id", "s"}``); a member that
lacks that version asks whoever told it (``rq``, answered with a ``push``). Requests and
answers are lost now and then, so an unanswered request is repeated every
``RECORD_WANT_RETRY`` up to ``RECORD_WANT_TRIES`` times. Pure bookkeeping over "which
version of a member's record do we hold": used by :class:`meshd.core.node.Node` and, for
10,000 nodes without signatures, by the simulator.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

from meshd.core.wire import Addr

#: Records asked for in one ``rq`` datagram (a push-pull answer names at most 128).
MAX_RECORD_REQUEST: Final = 128
#: A record asked for and not received is asked for again after this long (and one
#: announced again is not asked for sooner). memberlist's LAN probe timeout, the round
#: trip it allows a member: in the simulator a lost pull waiting 1 s for its retry set
#: the 99.99 % tail of a record's spread at 10,000 nodes (2.6 s; 1.6 s at 0.5 s).
RECORD_WANT_RETRY: Final = 0.5
#: How often one record is asked for before waiting for the next announcement or
#: push-pull: a request or its answer is lost at random now and then, and a member whose
#: view lacks records suspects with a short timeout and is gossiped to by few.
RECORD_WANT_TRIES: Final = 5
#: Records being asked for that are remembered (oldest forgotten first).
MAX_WANTED: Final = 4_096

#: The version of a member's record held now (0: none).
Held = Callable[[bytes], int]


def announcement(node_id: bytes, seq: int) -> tuple[dict[str, Any], bytes]:
    """The gossip item that announces version ``seq`` of ``node_id``'s record, and its
    broadcast-queue key (a newer announcement of one record replaces the older)."""
    return {"k": "v", "id": node_id, "s": seq}, b"r" + node_id


class RecordPull:
    """Wanted records (oldest first) and the requests not yet sent, per member asked."""

    __slots__ = ("_batch", "_wanted")

    def __init__(self) -> None:
        #: node id -> (seq wanted, when asked, whom, requests so far), oldest first.
        self._wanted: OrderedDict[bytes, tuple[int, float, Addr, int]] = OrderedDict()
        self._batch: dict[Addr, list[bytes]] = {}

    def want(self, nid: bytes, seq: int, addr: Addr, now: float, tries: int = 1) -> None:
        """Ask ``addr`` for a record, at most once per ``RECORD_WANT_RETRY`` per version;
        :meth:`retry` asks again if it does not arrive."""
        prev = self._wanted.get(nid)
        if prev is not None and prev[0] >= seq and now - prev[1] < RECORD_WANT_RETRY:
            return
        if prev is not None and prev[0] >= seq:
            tries = max(tries, prev[3] + 1)
        self._wanted[nid] = (max(seq, prev[0]) if prev else seq, now, addr, tries)
        self._wanted.move_to_end(nid)
        if len(self._wanted) > MAX_WANTED:
            self._wanted.popitem(last=False)
        self._batch.setdefault(addr, []).append(nid)

    def sync_needed(self, addr: Addr, ids: Iterable[bytes], held: Held, now: float) -> None:
        """A push-pull partner holds newer records: want one seq beyond what we hold."""
        for nid in ids:
            self.want(nid, held(nid) + 1, addr, now)

    def got(self, nid: bytes, seq: int) -> None:
        """Version ``seq`` of ``nid``'s record arrived."""
        w = self._wanted.get(nid)
        if w is not None and w[0] <= seq:
            del self._wanted[nid]

    def next_retry(self) -> float | None:
        if not self._wanted:
            return None
        return next(iter(self._wanted.values()))[1] + RECORD_WANT_RETRY

    def retry(self, now: float, held: Held) -> None:
        """Ask again for records requested ``RECORD_WANT_RETRY`` ago that did not come,
        up to ``RECORD_WANT_TRIES`` times (oldest first: O(1) when nothing is due)."""
        wanted = self._wanted
        while wanted:
            nid, (seq, asked, addr, tries) = next(iter(wanted.items()))
            if asked + RECORD_WANT_RETRY > now:
                break
            del wanted[nid]
            if tries < RECORD_WANT_TRIES and held(nid) < seq:
                self.want(nid, seq, addr, now, tries + 1)

    def requests(self) -> list[tuple[Addr, list[bytes]]]:
        """The ``rq`` datagrams to send now: (member, at most ``MAX_RECORD_REQUEST`` ids)."""
        if not self._batch:
            return []
        out = [
            (addr, ids[i : i + MAX_RECORD_REQUEST])
            for addr, ids in self._batch.items()
            for i in range(0, len(ids), MAX_RECORD_REQUEST)
        ]
        self._batch.clear()
        return out
