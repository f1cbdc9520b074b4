"""The overlay DNS server: asyncio UDP and TCP listeners answering from a :class:`ZoneView`.

dnslib is the codec only. Answers for the mesh's zones are authoritative (AA): SOA and
NS at each apex; NXDOMAIN for a name that does not exist and NOERROR with no answer
(NODATA) for a name without records of the asked type, both with the SOA in the
authority section (RFC 2308); empty non-terminals exist (RFC 8020); names are
case-insensitive and the question is echoed as the client spelled it. EDNS0 (RFC
6891): a response carries an OPT record when the query did, the DO bit is copied,
version > 0 gets BADVERS, and a UDP answer larger than the client's payload size
(at most :data:`MAX_UDP_PAYLOAD`, at least 512) goes out with TC set and no records,
so the client repeats it over TCP, where the full answer goes.

Queries outside the zones go to the upstream resolvers (by default the non-loopback
``nameserver`` lines of /etc/resolv.conf) over UDP, then TCP when the upstream
truncated a TCP client's answer, one upstream after the other, each within the
timeout; SERVFAIL when none answered, REFUSED when forwarding is off.

Hostile input: a datagram that is not a query (shorter than a header, or a response)
is dropped and counted; one that does not parse gets FORMERR; nothing escapes
:meth:`DnsServer.handle` and nothing blocks the loop. TCP connections are bounded in
number, and each read and write has a timeout.

Fast path: the answer to a plain query (one question, at most one OPT record) is
cached as bytes keyed by the lower-cased question and the EDNS flags; a hit only
patches the ID, the RD/CD bits and the client's spelling of the name in. On a miss, a
plain A/AAAA/PTR/NXDOMAIN/NODATA question inside a zone (below its apex) is answered
by encoding the bytes directly (~13 µs, against ~170 µs through dnslib).

Threads: each UDP socket is served by a thread of its own (:class:`_UdpThread`) with a
blocking ``recvfrom``: a plain query inside a zone is answered there and then, from the
cache or encoded (:meth:`DnsServer.cached`, ~0.4 µs for a repeated query), without
waking the event loop; the rest (the apex, ANY, forwards, anything dnslib must parse)
goes to the loop in batches. Only the loop changes the view, one entry at a time,
bumping its ``version`` after each change; a thread reads it one dict look-up at a time
and caches into an :class:`_Answers`, the cache of one version, which is replaced
(never emptied) when the version moves: a query read after an update has returned
never gets an answer from before it, so an update is visible at once.
TCP stays on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog

if TYPE_CHECKING:
    from dnslib import RR, DNSRecord

from meshd.core.naming import Host, Pointer, ZoneView
from meshd.core.wire import Addr, format_hostport

log = structlog.get_logger("meshd.dns")

DEFAULT_PORT: Final = 15353
#: The largest UDP answer we send, and the size our OPT record advertises (DNS flag day
#: 2020: fits any path without fragmentation).
MAX_UDP_PAYLOAD: Final = 1_232
MIN_UDP_PAYLOAD: Final = 512
FORWARD_TIMEOUT: Final = 2.0
MAX_UPSTREAMS: Final = 3
MAX_FORWARDS: Final = 256
TCP_MAX_CONNECTIONS: Final = 128
TCP_IDLE_TIMEOUT: Final = 10.0
TCP_IO_TIMEOUT: Final = 5.0
CACHE_MAX: Final = 8_192
#: The longest query kept whole as a key of the exact cache (EDNS options can make a
#: plain query 64 KB long: 8,192 of those would be 512 MB).
EXACT_KEY_MAX: Final = 512
RESOLV_CONF: Final = "/etc/resolv.conf"

#: Queries the event loop answers per turn for a UDP thread (cache misses) before
#: yielding to other work (and the GIL: a UDP thread waits for it while the loop holds
#: it, ~13 µs per miss, ~170 µs through dnslib), and how many may wait before more are
#: dropped and counted.
UDP_BATCH: Final = 16
UDP_PENDING_MAX: Final = 1_024
#: Receive buffer of a UDP socket (the kernel caps it at net.core.rmem_max): a burst
#: waits rather than being dropped.
UDP_RCVBUF: Final = 1 << 20
RECV_SIZE: Final = 65_535
THREAD_JOIN_TIMEOUT: Final = 2.0
#: Ephemeral ports tried for a port 0 request (UDP and TCP must share one).
PORT_ATTEMPTS: Final = 8
_IN: Final = 1
_ANY_CLASS: Final = 255
_T_A, _T_NS, _T_SOA, _T_PTR, _T_AAAA = 1, 2, 6, 12, 28
_T_OPT, _T_IXFR, _T_AXFR, _T_ANY = 41, 251, 252, 255
_OP_QUERY: Final = 0
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS: Final = 16
RCODE_NAMES: Final = {
    NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS",
}  # fmt: skip
#: Our OPT record with no options: root name, type 41, our payload size, TTL 0, no data.
_OPT_RR: Final = b"\x00\x00\x29" + MAX_UDP_PAYLOAD.to_bytes(2, "big") + b"\x00" * 6
#: The same with the DO bit (copied from a query that set it).
_OPT_RR_DO: Final = _OPT_RR[:7] + b"\x80" + _OPT_RR[8:]
#: A compression pointer to the question's name (offset 12), the owner of every answer.
_NAME_PTR: Final = b"\xc0\x0c"
#: Query types whose answers the byte-level encoder leaves to dnslib.
_SLOW_TYPES: Final = frozenset((_T_ANY, _T_AXFR, _T_IXFR, _T_OPT, _T_SOA, _T_NS))


@dataclass(frozen=True)
class DnsConfig:
    """How the agent runs the server. ``listen`` None: 127.0.0.1 and the overlay
    addresses on ``port``; otherwise exactly those addresses. ``upstreams`` None: the
    non-loopback resolvers of /etc/resolv.conf."""

    listen: tuple[Addr, ...] | None = None
    port: int = DEFAULT_PORT
    upstreams: tuple[Addr, ...] | None = None
    forward: bool = True
    timeout: float = FORWARD_TIMEOUT


def default_upstreams(path: str = RESOLV_CONF) -> list[Addr]:
    """The ``nameserver`` lines of resolv.conf that are not loopback (a local stub may
    forward to us: asking it back would loop), port 53, at most :data:`MAX_UPSTREAMS`."""
    out: list[Addr] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read(65_536).splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or parts[0] != "nameserver":
            continue
        host = parts[1]
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            continue
        if ip.is_loopback or ip.is_unspecified:
            continue
        out.append((host, 53))
        if len(out) == MAX_UPSTREAMS:
            break
    return out


# --------------------------------------------------------------------- wire helpers


@dataclass(frozen=True, slots=True)
class _Plain:
    """A plain query: one uncompressed question, at most one OPT record."""

    key: bytes  # lower-cased name + qtype + qclass + EDNS flag byte
    name_end: int  # offset just past the name's root label
    qend: int  # offset just past the question
    limit: int  # the largest UDP answer the client takes


def _plain(data: bytes) -> _Plain | None:
    """Recognise a plain query without dnslib; None sends it down the slow path."""
    n = len(data)
    # byte 2: QR, opcode, AA, TC must be 0 (RD free); byte 3: Z and RCODE 0 (AD/CD free)
    if n < 17 or data[2] & 0xFE or data[3] & 0x4F or data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None
    ar = data[10] << 8 | data[11]
    if ar > 1:
        return None
    i = 12
    while True:
        if i >= n:
            return None
        ln = data[i]
        if ln == 0:
            break
        if ln > 63:
            return None  # compression pointer or extended label type
        i += ln + 1
    name_end = i + 1
    if name_end - 12 > 255:
        return None
    qend = name_end + 4
    if qend > n:
        return None
    name = data[12:name_end].lower() + data[name_end:qend]
    if ar == 0:
        return _Plain(name + b"\x00", name_end, qend, MIN_UDP_PAYLOAD) if qend == n else None
    if n < qend + 11 or data[qend] != 0 or data[qend + 1 : qend + 3] != b"\x00\x29":
        return None
    if data[qend + 5] or data[qend + 6]:  # extended RCODE, version
        return None
    if qend + 11 + (data[qend + 9] << 8 | data[qend + 10]) != n:
        return None
    udp = data[qend + 3] << 8 | data[qend + 4]
    flag = b"\x02" if data[qend + 7] & 0x80 else b"\x01"
    limit = max(MIN_UDP_PAYLOAD, min(udp, MAX_UDP_PAYLOAD))
    return _Plain(name + flag, name_end, qend, limit)


def _patch(template: bytes, data: bytes, qend: int) -> bytes:
    """A cached answer for this query: its ID, RD and CD bits, its spelling of the name."""
    return b"".join(
        (
            data[:2],
            bytes((template[2] | (data[2] & 0x01), template[3] | (data[3] & 0x10))),
            template[4:12],
            data[12:qend],
            template[qend:],
        )
    )


def _wire_name(name: str) -> bytes:
    """A fully qualified ASCII name in uncompressed wire format."""
    out = b"".join(bytes((len(lb),)) + lb.encode("ascii") for lb in name.split(".") if lb)
    return out + b"\x00"


def _soa_rdata(view: ZoneView) -> bytes:
    """The RDATA of the zone's SOA record (names uncompressed)."""
    soa = view.soa()
    numbers = (soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum)
    return (
        _wire_name(soa.mname)
        + _wire_name(soa.rname)
        + b"".join((n & 0xFFFFFFFF).to_bytes(4, "big") for n in numbers)
    )


def _header_only(data: bytes, rcode: int) -> bytes:
    """A response with no sections: for FORMERR, when even the question is suspect."""
    flags2 = 0x80 | (data[2] & 0x79)  # QR, the query's opcode and RD
    return data[:2] + bytes((flags2, rcode & 0x0F)) + b"\x00" * 8


def _truncated(data: bytes, response: bytes, qend: int, edns: bool) -> bytes:
    """TC set, the question only (and our OPT): the client retries over TCP."""
    head = response[:2] + bytes((response[2] | 0x02, response[3])) + b"\x00\x01\x00\x00\x00\x00"
    if edns:
        return head + b"\x00\x01" + data[12:qend] + _OPT_RR
    return head + b"\x00\x00" + data[12:qend]


def _question_end(data: bytes) -> int | None:
    """End of the first question if it is uncompressed (offset past qtype/qclass)."""
    i, n = 12, len(data)
    while i < n:
        ln = data[i]
        if ln == 0:
            return i + 5 if i + 5 <= n else None
        if ln > 63:
            return None
        i += ln + 1
    return None


def _labels_key(labels: Sequence[bytes]) -> tuple[str | None, str | None]:
    """(the name as a zone key, the longest suffix that is a clean key)."""
    clean: list[str] = []
    for raw in reversed(labels):
        try:
            text = raw.decode("ascii").lower()
        except UnicodeDecodeError:
            break
        if not text or "." in text:
            break
        clean.append(text)
    suffix = ".".join(reversed(clean)) + "." if clean else "."
    full = suffix if len(clean) == len(labels) else None
    return full, suffix


#: The counter of each RCODE (the low four bits of byte 3 of a response).
_RCODE_KEYS: Final = tuple("rcode_" + RCODE_NAMES.get(rc, "other") for rc in range(16))


class _Answers:
    """The answer cache of one version of one view. Whoever first sees the version
    move (the loop or a UDP thread) replaces the whole object; nobody empties one in
    place, so a reader of it sees answers of that version (or of the update being
    committed as it reads) only."""

    __slots__ = ("exact", "plain", "soa", "version", "view")

    def __init__(self, view: ZoneView, version: int) -> None:
        self.view = view
        self.version = version
        #: :attr:`_Plain.key` -> template (no ID, RD, CD; lower-case name)
        self.plain: dict[bytes, bytes] = {}
        #: a query without its ID -> the answer without its ID, by the UDP threads
        self.exact: dict[bytes, bytes] = {}
        #: the zone's SOA RDATA at this version, built by the first negative answer
        self.soa: bytes | None = None


def _store(cache: dict[bytes, bytes], key: bytes, value: bytes) -> None:
    """Add to a cache of at most :data:`CACHE_MAX` entries (emptied when full: the
    hostile case, many names, costs one re-encoding each)."""
    if len(cache) >= CACHE_MAX:
        cache.clear()
    cache[key] = value


class _Forward:
    """handle() needs the upstreams: the caller awaits :meth:`DnsServer.forward`."""

    __slots__ = ("data", "edns", "limit", "qend")

    def __init__(self, data: bytes, limit: int, qend: int, edns: bool) -> None:
        self.data = data
        self.limit = limit
        self.qend = qend
        self.edns = edns


# ------------------------------------------------------------------------ the server


class DnsServer:
    """Answers queries from ``view``; ``start`` binds the listeners."""

    def __init__(
        self,
        view: ZoneView,
        *,
        upstreams: Iterable[Addr] = (),
        forward: bool = True,
        timeout: float = FORWARD_TIMEOUT,
        tcp_max: int = TCP_MAX_CONNECTIONS,
        tcp_idle: float = TCP_IDLE_TIMEOUT,
    ) -> None:
        self.view = view
        self.upstreams = list(upstreams)[:MAX_UPSTREAMS]
        self.forwarding = forward
        self.timeout = timeout
        self.tcp_max = tcp_max
        self.tcp_idle = tcp_idle
        self._stats: Counter[str] = Counter()  # the event loop's; each UDP thread has its own
        self.bound: list[Addr] = []
        self._answers = _Answers(view, -1)  # no view is at version -1: empty until asked
        self._udp: list[_UdpThread] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_active = 0
        self._forwards = 0

    @property
    def stats(self) -> Counter[str]:
        """The event loop's counters and every UDP thread's, summed (a copy)."""
        total: Counter[str] = Counter()
        for counts in (self._stats, *(t.counts for t in self._udp)):
            total.update(dict(counts))  # dict(): one C-level copy, safe against the thread
        return total

    # ------------------------------------------------------------ answering

    def _current(self) -> _Answers:
        """The cache of the view as it is now (any thread): a new one when the view or
        its version moved. The version is read before anything of the view, so the
        cache is never labelled newer than what goes into it; a thread and the loop
        that both replace it lose at most a few cached answers."""
        view = self.view
        version = view.version
        answers = self._answers
        if answers.view is not view or answers.version != version:
            answers = self._answers = _Answers(view, version)
        return answers

    def cached(self, data: bytes, counts: Counter[str] | None = None) -> bytes | None:
        """The answer to a UDP query of the fast path, or None (then :meth:`handle`
        answers it on the loop). Safe to call from any thread while the loop changes
        the view: it answers from the cache of the current version, or encodes a plain
        in-zone question from single dict reads of the view (:meth:`_encode`), which
        the loop changes entry by entry, bumping ``version`` after each. A query read
        after an update has returned is answered from that update on. Counts hits and
        encodings in ``counts``, the caller's own counters (not the rcode)."""
        answers = self._current()
        tail = data[2:]
        hit = answers.exact.get(tail)
        if hit is not None:
            if counts is not None:
                counts["cache_hits"] += 1
            return data[:2] + hit
        plain = _plain(data)
        if plain is None:
            return None
        template = answers.plain.get(plain.key)
        if template is not None:
            if counts is not None:
                counts["cache_hits"] += 1
        else:
            template = self._encode(data, plain, answers.view, answers)
            if template is None:
                return None
            if counts is not None:
                counts["encoded"] += 1
        if len(template) > plain.limit:
            return None
        out = _patch(template, data, plain.qend)
        if len(data) <= EXACT_KEY_MAX:
            _store(answers.exact, tail, out[2:])
        return out

    def handle(self, data: bytes, tcp: bool = False) -> bytes | _Forward | None:
        """One query in, one response out (None: dropped and counted). Never raises.
        Event loop only (the slow path keeps state of the loop's)."""
        try:
            answers = self._current()
            view = answers.view
            plain = _plain(data)
            if plain is not None:
                template = answers.plain.get(plain.key)
                if template is not None:
                    self._stats["cache_hits"] += 1
                else:
                    template = self._encode(data, plain, view, answers)
                    if template is not None:
                        self._stats["encoded"] += 1
                if template is not None and (tcp or len(template) <= plain.limit):
                    self._stats[_RCODE_KEYS[template[3] & 0x0F]] += 1
                    return _patch(template, data, plain.qend)
            return self._slow(data, tcp, plain, answers)
        except Exception:  # hostile input must never take the server down
            self._stats["dropped_internal_error"] += 1
            log.debug("dns query failed", exc_info=True)
            return None

    def _encode(
        self, data: bytes, plain: _Plain, view: ZoneView, answers: _Answers
    ) -> bytes | None:
        """The answer template (as :meth:`_remember` keeps them) for a plain query of a
        name inside a zone, built from bytes without dnslib (~10 µs against ~200 µs), and
        cached; None for what only the slow path answers (the apex, ANY, transfers,
        classes other than IN, names that are not clean ASCII labels, no zone). Any
        thread: it reads the view one dict look-up at a time and writes ``answers``
        only (counting is the caller's)."""
        name_end, qend = plain.name_end, plain.qend
        qtype = data[name_end] << 8 | data[name_end + 1]
        if data[name_end + 2 : qend] != b"\x00\x01" or qtype in _SLOW_TYPES:
            return None
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1 : i + 1 + data[i]])
            i += data[i] + 1
        key, suffix = _labels_key(labels)
        if key is None or suffix is None:
            return None
        apex = view.find_zone(key)
        if apex is None or apex == key:
            return None
        ttl = view.ttl.to_bytes(4, "big")
        entry = view.get(key)
        rcode, answer = NOERROR, b""
        if isinstance(entry, Host):
            if qtype == _T_A:
                answer = _NAME_PTR + b"\x00\x01\x00\x01" + ttl + b"\x00\x04" + entry.a.packed
            elif qtype == _T_AAAA:
                answer = _NAME_PTR + b"\x00\x1c\x00\x01" + ttl + b"\x00\x10" + entry.aaaa.packed
        elif isinstance(entry, Pointer):
            if qtype == _T_PTR:
                target = _wire_name(entry.target)
                answer = (
                    _NAME_PTR + b"\x00\x0c\x00\x01" + ttl
                    + len(target).to_bytes(2, "big") + target
                )  # fmt: skip
        elif not view.exists(key):
            rcode = NXDOMAIN
        authority = b""
        if not answer:  # negative answer: the zone's SOA (owner spelled as the zone is)
            soa = answers.soa
            if soa is None:
                soa = answers.soa = _soa_rdata(view)
            authority = (
                _wire_name(apex) + b"\x00\x06\x00\x01" + ttl
                + len(soa).to_bytes(2, "big") + soa
            )  # fmt: skip
        flag = plain.key[-1]  # 0: no EDNS, 1: EDNS, 2: EDNS with DO
        template = b"".join(
            (
                b"\x00\x00\x84",
                bytes((0x80 * self.forwarding | rcode,)),
                b"\x00\x01\x00\x01" if answer else b"\x00\x01\x00\x00",
                b"\x00\x01" if authority else b"\x00\x00",
                b"\x00\x01" if flag else b"\x00\x00",
                data[12:name_end].lower(),
                data[name_end:qend],
                answer,
                authority,
                (_OPT_RR_DO if flag == 2 else _OPT_RR) if flag else b"",
            )
        )
        _store(answers.plain, plain.key, template)
        return template

    def _drop(self, reason: str) -> None:
        self._stats["dropped_" + reason] += 1

    def _slow(
        self, data: bytes, tcp: bool, plain: _Plain | None, answers: _Answers | None = None
    ) -> bytes | _Forward | None:
        if len(data) < 12:
            self._drop("short")
            return None
        if data[2] & 0x80:
            self._drop("not_a_query")  # never answer a response (reflection loops)
            return None
        # dnslib is imported by the first query that needs it: an agent whose DNS
        # traffic stays on the byte-level path never loads it (0.4 MiB, 9 modules).
        from dnslib import DNSRecord

        try:
            req = DNSRecord.parse(data)
        except Exception:  # dnslib raises DNSError, and worse on odd input
            return self._rcode_only(data, FORMERR)
        if req.header.opcode != _OP_QUERY:
            return self._rcode_only(data, NOTIMP)
        if len(req.questions) != 1 or req.rr or req.auth:
            return self._rcode_only(data, FORMERR)
        opts = [rr for rr in req.ar if rr.rtype == _T_OPT]
        if len(opts) > 1 or any(len(o.rname.label) != 0 for o in opts):
            return self._rcode_only(data, FORMERR)
        opt = opts[0] if opts else None
        edns = opt is not None
        limit = MIN_UDP_PAYLOAD
        do = False
        if opt is not None:
            limit = max(MIN_UDP_PAYLOAD, min(int(opt.rclass), MAX_UDP_PAYLOAD))
            do = bool(opt.ttl & 0x8000)
            if (opt.ttl >> 16) & 0xFF:  # EDNS version we do not speak
                return self._respond(data, req, None, tcp, limit, edns, do, ext_rcode=1)
        q = req.q
        view = self.view
        key, suffix = _labels_key(q.qname.label)
        apex = view.find_zone(suffix) if suffix is not None else None
        if apex is None:
            if q.qclass not in (_IN, _ANY_CLASS) or q.qtype in (_T_AXFR, _T_IXFR):
                return self._respond(data, req, REFUSED, tcp, limit, edns, do, aa=False)
            if not self.forwarding or not self.upstreams:
                self._stats["refused_no_forwarding"] += 1
                return self._respond(data, req, REFUSED, tcp, limit, edns, do, aa=False)
            qend = _question_end(data)
            if qend is None:
                return self._rcode_only(data, FORMERR)
            return _Forward(data, limit, qend, edns)
        reply = self._authoritative(req, key, apex, view)
        response = self._finish(data, reply, tcp, limit, edns, do)
        if plain is not None and answers is not None:
            self._remember(plain, data, response, answers)
        return response

    def _rcode_only(self, data: bytes, rcode: int) -> bytes:
        self._stats["rcode_" + RCODE_NAMES.get(rcode, "other")] += 1
        return _header_only(data, rcode)

    @staticmethod
    def _remember(plain: _Plain, data: bytes, response: bytes, answers: _Answers) -> None:
        """Keep the response as a template (no ID, RD or CD; lower-case name)."""
        if response[2] & 0x02 or response[12 : plain.qend] != data[12 : plain.qend]:
            return  # truncated, or dnslib spelled the question differently: do not cache
        template = b"".join(
            (
                b"\x00\x00",
                bytes((response[2] & 0xFE, response[3] & 0xEF)),
                response[4:12],
                data[12 : plain.name_end].lower(),
                response[plain.name_end :],
            )
        )
        _store(answers.plain, plain.key, template)

    def _authoritative(
        self, req: DNSRecord, key: str | None, apex: str, view: ZoneView
    ) -> DNSRecord:
        from dnslib import AAAA, NS, PTR, RR, A, DNSHeader, DNSRecord

        q = req.q
        reply = DNSRecord(
            DNSHeader(id=req.header.id, qr=1, aa=1, rd=0, ra=int(self.forwarding)), q=q
        )
        qtype, qname = q.qtype, q.qname
        ttl = view.ttl
        if q.qclass not in (_IN, _ANY_CLASS) or qtype in (_T_AXFR, _T_IXFR):
            reply.header.rcode = REFUSED
            reply.header.aa = 0
            return reply
        if key is not None and key == apex:
            if qtype in (_T_SOA, _T_ANY):
                reply.add_answer(self._soa_rr(qname, view))
            if qtype in (_T_NS, _T_ANY):
                ns = view.ns_name()
                reply.add_answer(RR(qname, _T_NS, ttl=ttl, rdata=NS(ns)))
                glue = view.get(ns)
                if isinstance(glue, Host):
                    reply.add_ar(RR(ns, _T_A, ttl=ttl, rdata=A(str(glue.a))))
                    reply.add_ar(RR(ns, _T_AAAA, ttl=ttl, rdata=AAAA(str(glue.aaaa))))
        else:
            entry = view.get(key) if key is not None else None
            if isinstance(entry, Host):
                if qtype in (_T_A, _T_ANY):
                    reply.add_answer(RR(qname, _T_A, ttl=ttl, rdata=A(str(entry.a))))
                if qtype in (_T_AAAA, _T_ANY):
                    reply.add_answer(RR(qname, _T_AAAA, ttl=ttl, rdata=AAAA(str(entry.aaaa))))
            elif isinstance(entry, Pointer):
                if qtype in (_T_PTR, _T_ANY):
                    reply.add_answer(RR(qname, _T_PTR, ttl=ttl, rdata=PTR(entry.target)))
            elif key is None or not view.exists(key):
                reply.header.rcode = NXDOMAIN
        if not reply.rr:
            reply.add_auth(self._soa_rr(apex, view))  # negative answer (RFC 2308)
        return reply

    @staticmethod
    def _soa_rr(name: Any, view: ZoneView) -> RR:
        from dnslib import RR, SOA

        soa = view.soa()
        return RR(
            name,
            _T_SOA,
            ttl=view.ttl,
            rdata=SOA(
                soa.mname,
                soa.rname,
                (soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum),
            ),
        )

    def _respond(
        self,
        data: bytes,
        req: DNSRecord,
        rcode: int | None,
        tcp: bool,
        limit: int,
        edns: bool,
        do: bool,
        *,
        aa: bool = True,
        ext_rcode: int = 0,
    ) -> bytes:
        from dnslib import DNSHeader, DNSRecord

        reply = DNSRecord(
            DNSHeader(id=req.header.id, qr=1, aa=int(aa), rd=0, ra=int(self.forwarding)),
            q=req.q,
        )
        reply.header.rcode = rcode or 0
        return self._finish(data, reply, tcp, limit, edns, do, ext_rcode)

    def _finish(
        self,
        data: bytes,
        reply: DNSRecord,
        tcp: bool,
        limit: int,
        edns: bool,
        do: bool,
        ext_rcode: int = 0,
    ) -> bytes:
        if edns:
            from dnslib import EDNS0 as Edns0

            reply.add_ar(
                Edns0(udp_len=MAX_UDP_PAYLOAD, flags="do" if do else "", ext_rcode=ext_rcode)
            )
        out = bytearray(reply.pack())
        out[0:2] = data[0:2]
        out[2] |= data[2] & 0x01  # RD
        out[3] |= data[3] & 0x10  # CD
        rcode = (ext_rcode << 4) | (out[3] & 0x0F)
        self._stats["rcode_" + (RCODE_NAMES.get(rcode, "other") if rcode < 16 else "BADVERS")] += 1
        if not tcp and len(out) > limit:
            self._stats["truncated"] += 1
            qend = _question_end(data)
            if qend is None:
                return _header_only(data, SERVFAIL)
            return _truncated(data, bytes(out), qend, edns)
        return bytes(out)

    # ------------------------------------------------------------ forwarding

    async def forward(self, fwd: _Forward, tcp: bool) -> bytes:
        """Ask the upstreams in turn; SERVFAIL when none gave a matching answer in time."""
        data = fwd.data
        if self._forwards >= MAX_FORWARDS:
            self._stats["forward_busy"] += 1
            return self._servfail(fwd)
        self._forwards += 1
        try:
            for upstream in self.upstreams:
                qid = os.urandom(2)
                query = qid + data[2:]
                try:
                    resp = await asyncio.wait_for(
                        self._udp_exchange(upstream, query, fwd), self.timeout
                    )
                    if resp[2] & 0x02 and tcp:
                        resp = await asyncio.wait_for(
                            self._tcp_exchange(upstream, query, fwd), self.timeout
                        )
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                    self._stats["forward_errors"] += 1
                    continue
                self._stats["forwarded"] += 1
                out = data[:2] + resp[2:]
                if not tcp and len(out) > fwd.limit:
                    self._stats["truncated"] += 1
                    return _truncated(data, out, fwd.qend, fwd.edns)
                return out
            self._stats["forward_failed"] += 1
            return self._servfail(fwd)
        finally:
            self._forwards -= 1

    def _servfail(self, fwd: _Forward) -> bytes:
        self._stats["rcode_SERVFAIL"] += 1
        data = fwd.data
        head = data[:2] + bytes((0x80 | (data[2] & 0x79), 0x80 * self.forwarding | 2))
        body = data[12 : fwd.qend]
        if fwd.edns:
            return head + b"\x00\x01\x00\x00\x00\x00\x00\x01" + body + _OPT_RR
        return head + b"\x00\x01\x00\x00\x00\x00\x00\x00" + body

    @staticmethod
    def _valid_reply(resp: bytes, query: bytes, fwd: _Forward) -> bool:
        return (
            len(resp) >= fwd.qend
            and resp[:2] == query[:2]
            and bool(resp[2] & 0x80)
            and resp[12 : fwd.qend].lower() == query[12 : fwd.qend].lower()
        )

    async def _udp_exchange(self, upstream: Addr, query: bytes, fwd: _Forward) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        valid = self._valid_reply

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, resp: bytes, addr: Any) -> None:
                if not done.done() and valid(resp, query, fwd):
                    done.set_result(resp)

            def error_received(self, exc: Exception) -> None:
                if not done.done():
                    done.set_exception(exc)

        transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=upstream)
        try:
            transport.sendto(query)
            return await done
        finally:
            transport.close()

    async def _tcp_exchange(self, upstream: Addr, query: bytes, fwd: _Forward) -> bytes:
        reader, writer = await asyncio.open_connection(upstream[0], upstream[1])
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            resp = await reader.readexactly(size)
            if not self._valid_reply(resp, query, fwd):
                raise ValueError("upstream answered another question")
            return resp
        finally:
            writer.close()

    # ------------------------------------------------------------ transports

    async def start(self, addrs: Sequence[Addr], *, strict: bool = True) -> list[Addr]:
        """Listen on UDP and TCP at each address. ``strict``: an address that cannot be
        bound is an OSError; otherwise it is logged and skipped."""
        loop = asyncio.get_running_loop()
        for host, port in addrs:
            try:
                usock, tsock, port = _bind_pair(host, port)
            except OSError as exc:
                if strict:
                    await self.stop()
                    raise OSError(
                        exc.errno, f"cannot bind DNS to {format_hostport((host, port))}: "
                        f"{exc.strerror or exc}"
                    ) from None  # fmt: skip
                log.warning(
                    "dns address skipped", addr=format_hostport((host, port)), error=str(exc)
                )
                continue
            self._udp.append(_UdpThread(self, usock, loop))
            self._tcp.append(await asyncio.start_server(self._tcp_client, sock=tsock))
            self.bound.append((host, port))
        return list(self.bound)

    async def stop(self) -> None:
        for t in self._udp:
            t.close()
            self._stats.update(dict(t.counts))  # keep the thread's counts
        for s in self._tcp:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1.0)
        self._udp, self._tcp, self.bound = [], [], []

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_udp(self, fwd: _Forward, listener: _UdpThread, addr: Any) -> None:
        listener.sendto(await self.forward(fwd, tcp=False), addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_active >= self.tcp_max:
            self._drop("tcp_busy")
            writer.close()
            return
        self._tcp_active += 1
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                    size = int.from_bytes(head, "big")
                    if size == 0:
                        self._drop("tcp_empty")
                        return
                    data = await asyncio.wait_for(reader.readexactly(size), TCP_IO_TIMEOUT)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
                    return
                self._stats["queries_tcp"] += 1
                out = self.handle(data, tcp=True)
                if isinstance(out, _Forward):
                    out = await self.forward(out, tcp=True)
                if out is None:
                    return  # not a query: end the conversation
                writer.write(len(out).to_bytes(2, "big") + out)
                try:
                    await asyncio.wait_for(writer.drain(), TCP_IO_TIMEOUT)
                except (TimeoutError, ConnectionError, OSError):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a connection's failure must not end the server
            self._stats["dropped_internal_error"] += 1
        finally:
            self._tcp_active -= 1
            writer.close()


class _UdpThread:
    """One UDP socket served by a thread of its own: a blocking ``recvfrom``, the answer
    from :meth:`DnsServer.cached` sent straight back, everything else (the apex,
    forwards, bad packets) queued for the event loop, which drains up to
    :data:`UDP_BATCH` per turn. No event-loop wake-up per cached answer (at 5,000
    q/s that wake-up cost ~40 µs of CPU per query, the answer ~4 µs). Replies never
    block: one the socket buffer cannot take is dropped and counted, like any UDP loss."""

    def __init__(self, server: DnsServer, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.server = server
        self.sock = sock
        self.loop = loop
        #: this thread's counters (written here only; DnsServer.stats adds them up)
        self.counts: Counter[str] = Counter()
        self.closing = False
        self._misses: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._scheduled = False
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.setblocking(True)
        host, port = sock.getsockname()[:2]
        self.thread = threading.Thread(
            target=self._run, name=f"meshd-dns-{format_hostport((host, port))}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        counts, sock = self.counts, self.sock
        recvfrom, sendto, cached = sock.recvfrom, sock.sendto, self.server.cached
        while True:
            try:
                data, addr = recvfrom(RECV_SIZE)
            except OSError:
                if self.closing:
                    return
                counts["udp_errors"] += 1
                time.sleep(0.001)  # a persistent error must not spin
                continue
            if addr is None:  # shut down by close()
                return
            counts["queries_udp"] += 1
            try:
                out = cached(data, counts)
            except Exception:  # never expected: let the loop's full path decide
                out = None
            if out is None:
                self._to_loop(data, addr)
                continue
            counts[_RCODE_KEYS[out[3] & 0x0F]] += 1
            try:
                sendto(out, socket.MSG_DONTWAIT, addr)
            except BlockingIOError:
                counts["dropped_send_buffer_full"] += 1
            except OSError:
                counts["udp_errors"] += 1

    def _to_loop(self, data: bytes, addr: Any) -> None:
        """Queue a query the cache cannot answer (this thread)."""
        if len(self._misses) >= UDP_PENDING_MAX:
            self.counts["dropped_loop_busy"] += 1
            return
        self._misses.append((data, addr))
        if not self._scheduled:
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: the server is going away
                self.counts["udp_errors"] += 1

    def _drain(self) -> None:
        """Answer up to :data:`UDP_BATCH` queued queries (event loop)."""
        server, misses = self.server, self._misses
        for _ in range(UDP_BATCH):
            if not misses or self.closing:
                break
            data, addr = misses.popleft()
            out = server.handle(data, tcp=False)
            if isinstance(out, _Forward):
                server._spawn(server._forward_udp(out, self, addr))
            elif out is not None:
                self.sendto(out, addr)
        if misses and not self.closing:
            self.loop.call_soon(self._drain)
            return
        self._scheduled = False
        if misses and not self.closing:  # queued after the check above, not scheduled
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def sendto(self, data: bytes, addr: Any) -> None:
        """Send from the event loop (forwarded answers, misses)."""
        if self.closing:
            return
        try:
            self.sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except BlockingIOError:
            self.server._stats["dropped_send_buffer_full"] += 1
        except OSError:
            self.server._stats["udp_errors"] += 1

    def close(self) -> None:
        """Stop the thread (shutdown wakes its recvfrom) and close the socket."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # ENOTCONN on UDP, but it wakes the reader
        self.thread.join(THREAD_JOIN_TIMEOUT)
        if self.thread.is_alive():
            log.warning("dns udp thread did not stop", thread=self.thread.name)
        self.sock.close()
        self._misses.clear()


_IP_FREEBIND: Final = 15  # Linux; also honoured by IPv6 sockets


def bind_socket(host: str, port: int, kind: int) -> socket.socket:
    """A bound, non-blocking socket. Non-loopback addresses are bound with IP_FREEBIND,
    so the overlay addresses can be bound before the WireGuard interface has them."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if not ip.is_loopback and not ip.is_unspecified:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket, int]:
    """UDP and TCP sockets on one port. Port 0: the UDP socket's ephemeral port, tried
    again with another when a TCP socket (a client's, maybe another program's) holds
    it, which on a busy host happens."""
    attempts = PORT_ATTEMPTS if port == 0 else 1
    while True:
        attempts -= 1
        usock = bind_socket(host, port, socket.SOCK_DGRAM)
        got = int(usock.getsockname()[1])
        try:
            return usock, bind_socket(host, got, socket.SOCK_STREAM), got
        except OSError as exc:
            usock.close()
            if exc.errno != errno.EADDRINUSE or attempts <= 0:
                raise


def listen_addresses(config: DnsConfig, overlay: Sequence[str]) -> list[Addr]:
    """Where the server listens: the configured addresses, or 127.0.0.1 and the overlay."""
    if config.listen is not None:
        return list(config.listen)
    return [("127.0.0.1", config.port), *((a, config.port) for a in overlay)]
