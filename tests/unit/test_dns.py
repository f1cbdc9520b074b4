"""The DNS server (meshd.dns) with raw packets on 127.0.0.1: answers, EDNS0, TC and TCP,
forwarding to a fake upstream on loopback, and hostile input over UDP and TCP.

The server runs on an asyncio loop in a background thread; tests talk to it with plain
blocking sockets (with timeouts), so hypothesis can drive the sockets directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshd.dns
from meshd.core.ipam import AddressPlan
from meshd.core.membership import MemberState
from meshd.core.naming import Member, ZoneView, reverse_name
from meshd.dns import MAX_UDP_PAYLOAD, NXDOMAIN, UDP_PENDING_MAX, DnsServer, default_upstreams

T = TypeVar("T")
PLAN = AddressPlan.parse("10.200.0.0/16", "fd00:200::/48")
LONG_HOST = ".".join(["h" * 60] * 3)  # a long but valid hostname


def nid(i: int) -> bytes:
    return i.to_bytes(16, "big")


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine or callable on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, what: Coroutine[Any, Any, T] | Callable[[], T], timeout: float = 10) -> T:
        if asyncio.iscoroutine(what):
            return asyncio.run_coroutine_threadsafe(what, self.loop).result(timeout)

        async def call() -> T:
            assert callable(what)
            return what()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def lt() -> Iterator[LoopThread]:
    t = LoopThread()
    yield t
    t.close()


def make_zone() -> ZoneView:
    members = [
        (Member(nid(1), "alpha", "web.prod", 1, 1.0), MemberState.ALIVE),
        (Member(nid(2), "beta", LONG_HOST, 2, 2.0), MemberState.ALIVE),
        (Member(nid(3), "gamma", None, 3, 3.0), MemberState.SUSPECT),
    ]
    return ZoneView.build(PLAN, "mesh.internal.", members, nid(1), self_id=nid(1))


class Srv:
    def __init__(self, lt: LoopThread, server: DnsServer) -> None:
        self.lt = lt
        self.server = server
        self.port = server.bound[0][1]
        self.addr = ("127.0.0.1", self.port)

    @property
    def zone(self) -> ZoneView:
        return self.server.view

    def udp(self, packet: bytes, timeout: float = 3.0) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(packet, self.addr)
            try:
                return s.recv(65_535)
            except TimeoutError:
                return None

    def tcp(self, *packets: bytes, timeout: float = 3.0) -> list[bytes]:
        with socket.create_connection(self.addr, timeout=timeout) as s:
            for p in packets:
                s.sendall(struct.pack("!H", len(p)) + p)
            return [read_frame(s) for _ in packets]

    def query(self, name: str, qtype: str = "A", **kw: Any) -> DNSRecord:
        raw = self.udp(packet(name, qtype, **kw))
        assert raw is not None, "no answer"
        return DNSRecord.parse(raw)


def read_frame(s: socket.socket) -> bytes:
    head = recv_exactly(s, 2)
    return recv_exactly(s, struct.unpack("!H", head)[0])


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def packet(
    name: str, qtype: str = "A", *, edns: int | None = None, do: bool = False, qid: int = 4242,
    version: int = 0,
) -> bytes:  # fmt: skip
    q = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else "", version=version))
    return bytes(q.pack())


@pytest.fixture
def srv(lt: LoopThread) -> Iterator[Srv]:
    server = DnsServer(make_zone(), upstreams=[], forward=False, tcp_idle=0.5)
    lt.run(server.start([("127.0.0.1", 0)]))
    try:
        yield Srv(lt, server)
    finally:
        lt.run(server.stop())


def answers(r: DNSRecord) -> list[tuple[str, str, str]]:
    return [(str(rr.rname).lower(), QTYPE[rr.rtype], str(rr.rdata)) for rr in r.rr]


# ------------------------------------------------------------------ authoritative


def test_a_aaaa_and_ptr(srv: Srv) -> None:
    r = srv.query("alpha.mesh.internal", "A")
    assert r.header.rcode == RCODE.NOERROR and r.header.aa == 1 and r.header.id == 4242
    assert answers(r) == [("alpha.mesh.internal.", "A", "10.200.0.1")]
    assert r.rr[0].ttl == 5
    r = srv.query("web.prod.mesh.internal", "AAAA")
    assert answers(r) == [("web.prod.mesh.internal.", "AAAA", "fd00:200::1")]
    r = srv.query("gamma.mesh.internal", "A")  # suspect members stay in DNS
    assert answers(r) == [("gamma.mesh.internal.", "A", "10.200.0.3")]
    r = srv.query("2.0.200.10.in-addr.arpa", "PTR")
    assert answers(r) == [("2.0.200.10.in-addr.arpa.", "PTR", "beta.mesh.internal.")]
    rev6 = reverse_name(IPv6Address("fd00:200::3"))
    r = srv.query(rev6, "PTR")
    assert r.header.aa == 1 and answers(r) == [(rev6, "PTR", "gamma.mesh.internal.")]
    r = srv.query("leader.mesh.internal", "ANY")
    assert sorted(answers(r)) == [
        ("leader.mesh.internal.", "A", "10.200.0.1"),
        ("leader.mesh.internal.", "AAAA", "fd00:200::1"),
    ]


def test_nxdomain_and_nodata_carry_the_soa(srv: Srv) -> None:
    for name, qtype, rcode in (
        ("nope.mesh.internal", "A", RCODE.NXDOMAIN),
        ("a.b.alpha.mesh.internal", "AAAA", RCODE.NXDOMAIN),
        ("9.9.200.10.in-addr.arpa", "PTR", RCODE.NXDOMAIN),
        ("alpha.mesh.internal", "MX", RCODE.NOERROR),
        ("alpha.mesh.internal", "PTR", RCODE.NOERROR),
        ("prod.mesh.internal", "A", RCODE.NOERROR),  # empty non-terminal
        ("0.200.10.in-addr.arpa", "PTR", RCODE.NOERROR),
        ("2.0.200.10.in-addr.arpa", "A", RCODE.NOERROR),
        ("mesh.internal", "A", RCODE.NOERROR),
    ):
        r = srv.query(name, qtype)
        assert r.header.rcode == rcode, (name, qtype)
        assert r.header.aa == 1 and r.rr == []
        [soa] = r.auth
        assert QTYPE[soa.rtype] == "SOA"
        apex = "mesh.internal." if "arpa" not in name else "200.10.in-addr.arpa."
        assert str(soa.rname) == apex
        assert soa.ttl == 5 and soa.rdata.times[-1] == 5  # negative TTL (RFC 2308)


def test_soa_and_ns_at_the_apexes(srv: Srv) -> None:
    r = srv.query("mesh.internal", "SOA")
    [soa] = r.rr
    assert str(soa.rdata.mname) == "alpha.mesh.internal."
    assert str(soa.rdata.rname) == "hostmaster.mesh.internal."
    assert soa.rdata.times[0] == srv.zone.serial
    r = srv.query("mesh.internal", "NS")
    assert answers(r) == [("mesh.internal.", "NS", "alpha.mesh.internal.")]
    assert sorted(QTYPE[rr.rtype] for rr in r.ar) == ["A", "AAAA"]  # glue
    r = srv.query("0.0.0.0.0.0.2.0.0.0.d.f.ip6.arpa", "SOA")
    assert r.header.aa == 1 and QTYPE[r.rr[0].rtype] == "SOA"
    r = srv.query("200.10.in-addr.arpa", "NS")
    assert answers(r) == [("200.10.in-addr.arpa.", "NS", "alpha.mesh.internal.")]


def test_names_are_case_insensitive_and_the_question_is_echoed(srv: Srv) -> None:
    for name in ("alpha.mesh.internal", "ALPHA.MESH.INTERNAL", "aLpHa.Mesh.Internal") * 2:
        raw = srv.udp(packet(name, qid=7))
        assert raw is not None
        r = DNSRecord.parse(raw)
        assert str(r.q.qname) == name + "."  # exactly as asked (DNS 0x20)
        assert [str(rr.rdata) for rr in r.rr] == ["10.200.0.1"] and r.header.id == 7
    assert srv.server.stats["cache_hits"] >= 4  # later spellings come from the cache
    r = srv.query("NOPE.Mesh.Internal")
    assert r.header.rcode == RCODE.NXDOMAIN


def test_rd_and_cd_are_copied_and_ra_tells_whether_we_forward(srv: Srv) -> None:
    for rd in (0, 1):
        q = DNSRecord(DNSHeader(id=1, rd=rd, cd=1), q=DNSQuestion("alpha.mesh.internal"))
        for _ in range(2):  # miss, then cache hit
            raw = srv.udp(bytes(q.pack()))
            assert raw is not None
            h = DNSRecord.parse(raw).header
            assert (h.rd, h.cd, h.ra, h.aa, h.qr) == (rd, 1, 0, 1, 1)


def test_an_update_is_visible_at_once(srv: Srv) -> None:
    assert answers(srv.query("beta.mesh.internal"))  # now cached
    alpha = Member(nid(1), "alpha", "web.prod", 1, 1.0)
    srv.lt.run(lambda: srv.zone.update(Member(nid(2), "beta", "db", 2, 2.0), MemberState.DEAD))
    assert srv.query("beta.mesh.internal").header.rcode == RCODE.NXDOMAIN
    assert srv.query("2.0.200.10.in-addr.arpa", "PTR").header.rcode == RCODE.NXDOMAIN
    srv.lt.run(lambda: srv.zone.update(Member(nid(2), "beta", "db", 2, 2.0), MemberState.ALIVE))
    assert answers(srv.query("db.mesh.internal"))[0][2] == "10.200.0.2"
    srv.lt.run(lambda: srv.zone.update(Member(nid(1), "alpha", "db2", 1, 1.0), MemberState.ALIVE))
    assert srv.query("web.prod.mesh.internal").header.rcode == RCODE.NXDOMAIN
    assert alpha.name == "alpha"


def test_refused_out_of_zone_when_forwarding_is_off(srv: Srv) -> None:
    r = srv.query("example.com", "A")
    assert r.header.rcode == RCODE.REFUSED and r.header.aa == 0 and r.rr == []
    assert srv.server.stats["refused_no_forwarding"] == 1


def test_other_opcodes_classes_and_transfers(srv: Srv) -> None:
    q = DNSRecord(DNSHeader(id=9, opcode=4), q=DNSQuestion("alpha.mesh.internal"))  # NOTIFY
    r = DNSRecord.parse(srv.udp(bytes(q.pack())) or b"")
    assert r.header.rcode == RCODE.NOTIMP
    q = DNSRecord(DNSHeader(id=9), q=DNSQuestion("alpha.mesh.internal", QTYPE.A, 3))  # CH
    assert DNSRecord.parse(srv.udp(bytes(q.pack())) or b"").header.rcode == RCODE.REFUSED
    assert srv.query("mesh.internal", "AXFR").header.rcode == RCODE.REFUSED
    two = DNSRecord(DNSHeader(id=9), questions=[DNSQuestion("a.mesh.internal")] * 2)
    assert DNSRecord.parse(srv.udp(bytes(two.pack())) or b"").header.rcode == RCODE.FORMERR


# ---------------------------------------------------------------------------- EDNS0


def opt_of(r: DNSRecord) -> Any:
    opts = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
    return opts[0] if opts else None


def test_edns_is_answered_with_edns_and_the_do_bit_is_copied(srv: Srv) -> None:
    assert opt_of(srv.query("alpha.mesh.internal")) is None
    for do in (False, True, False):
        r = srv.query("alpha.mesh.internal", edns=4096, do=do)
        opt = opt_of(r)
        assert opt is not None and opt.rclass == MAX_UDP_PAYLOAD
        assert bool(opt.ttl & 0x8000) == do
        assert answers(r) == [("alpha.mesh.internal.", "A", "10.200.0.1")]


def test_an_unknown_edns_version_gets_badvers(srv: Srv) -> None:
    r = srv.query("alpha.mesh.internal", edns=1232, version=1)
    opt = opt_of(r)
    assert opt is not None and (opt.ttl >> 24) == 1 and r.header.rcode == 0  # 16 = BADVERS
    assert r.rr == []


def test_two_opt_records_are_a_format_error(srv: Srv) -> None:
    q = DNSRecord.parse(packet("alpha.mesh.internal", edns=1232))
    q.add_ar(EDNS0(udp_len=1232))
    r = DNSRecord.parse(srv.udp(bytes(q.pack())) or b"")
    assert r.header.rcode == RCODE.FORMERR


def test_long_answers_fit_or_are_truncated_by_the_clients_size(srv: Srv) -> None:
    name = f"{LONG_HOST}.mesh.internal"
    r = srv.query(name, "ANY")
    assert len(r.rr) == 2 and r.header.tc == 0  # ~430 bytes fits 512
    big = DNSRecord(DNSHeader(id=1, qr=1, aa=1), q=DNSQuestion(name))
    for i in range(60):
        big.add_answer(RR(name, QTYPE.A, rdata=A(f"10.200.0.{i}")))
    query = packet(name)
    out = srv.server._finish(query, big, False, 512, False, False)
    r = DNSRecord.parse(out)
    assert r.header.tc == 1 and r.rr == [] and str(r.q.qname) == name + "."
    full = srv.server._finish(query, big, True, 512, False, False)
    assert len(DNSRecord.parse(full).rr) == 60


# ----------------------------------------------------------------------------- TCP


def test_tcp_answers_several_queries_on_one_connection(srv: Srv) -> None:
    outs = srv.tcp(
        packet("alpha.mesh.internal", qid=1),
        packet("BETA.mesh.internal", "AAAA", qid=2),
        packet("nope.mesh.internal", qid=3),
        packet("1.0.200.10.in-addr.arpa", "PTR", qid=4),
    )
    rs = [DNSRecord.parse(o) for o in outs]
    assert [r.header.id for r in rs] == [1, 2, 3, 4]
    assert answers(rs[0])[0][2] == "10.200.0.1"
    assert answers(rs[1])[0][2] == "fd00:200::2"
    assert rs[2].header.rcode == RCODE.NXDOMAIN
    assert answers(rs[3])[0][2] == "alpha.mesh.internal."


def test_idle_and_stalled_tcp_connections_are_closed(srv: Srv) -> None:
    t0 = time.monotonic()
    with socket.create_connection(srv.addr, timeout=5) as s:
        s.sendall(b"\x00")  # half a length prefix, then nothing (slowloris)
        assert s.recv(10) == b""  # closed by the server
    assert time.monotonic() - t0 < 4


def test_tcp_connections_are_bounded(lt: LoopThread) -> None:
    server = DnsServer(make_zone(), forward=False, tcp_max=2, tcp_idle=2.0)
    lt.run(server.start([("127.0.0.1", 0)]))
    s = Srv(lt, server)
    try:
        held = [socket.create_connection(s.addr, timeout=3) for _ in range(2)]
        deadline = time.monotonic() + 5
        while lt.run(lambda: server._tcp_active) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.create_connection(s.addr, timeout=3) as extra:
            assert extra.recv(10) == b""
        assert server.stats["dropped_tcp_busy"] >= 1
        for h in held:
            h.close()
        time.sleep(0.2)
        assert s.tcp(packet("alpha.mesh.internal"))  # slots are released
    finally:
        lt.run(server.stop())


# ----------------------------------------------------------------------- forwarding


class FakeUpstream(asyncio.DatagramProtocol):
    """A resolver on 127.0.0.1 (UDP and TCP) whose behaviour the test picks."""

    def __init__(self) -> None:
        self.mode = "answer"
        self.records = 1
        self.udp_queries = 0
        self.tcp_queries = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    def answer(self, data: bytes, tcp: bool) -> bytes:
        q = DNSRecord.parse(data)
        r = q.reply()
        if self.mode == "tc" and not tcp:
            r.header.tc = 1
            return bytes(r.pack())
        for i in range(self.records):
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(f"192.0.2.{i % 250}"), ttl=60))
        out = bytes(r.pack())
        if self.mode == "wrong_id":
            out = bytes([out[0] ^ 0xFF]) + out[1:]
        return out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.udp_queries += 1
        if self.mode != "silent" and self.transport is not None:
            self.transport.sendto(self.answer(data, False), addr)

    async def on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        data = await reader.readexactly(size)
        self.tcp_queries += 1
        out = self.answer(data, True)
        writer.write(struct.pack("!H", len(out)) + out)
        await writer.drain()
        writer.close()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.port = self.transport.get_extra_info("sockname")[1]
        self.server = await asyncio.start_server(self.on_tcp, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
def upstreams(lt: LoopThread) -> Iterator[list[FakeUpstream]]:
    ups = [FakeUpstream(), FakeUpstream()]
    for u in ups:
        lt.run(u.start())
    yield ups
    for u in ups:
        lt.run(u.stop())


def forwarding_server(lt: LoopThread, ups: list[FakeUpstream], timeout: float = 3.0) -> Srv:
    server = DnsServer(
        make_zone(), upstreams=[("127.0.0.1", u.port) for u in ups], forward=True, timeout=timeout
    )
    lt.run(server.start([("127.0.0.1", 0)]))
    return Srv(lt, server)


def test_out_of_zone_queries_are_forwarded(lt: LoopThread, upstreams: list[FakeUpstream]) -> None:
    s = forwarding_server(lt, upstreams)
    try:
        r = s.query("www.example.com", qid=777)
        assert r.header.id == 777 and r.header.rcode == RCODE.NOERROR
        assert answers(r) == [("www.example.com.", "A", "192.0.2.0")]
        assert upstreams[0].udp_queries == 1 and upstreams[1].udp_queries == 0
        r = s.query("alpha.mesh.internal")  # in-zone: never forwarded, RA now set
        assert r.header.ra == 1 and r.header.aa == 1
        assert upstreams[0].udp_queries == 1
        [out] = s.tcp(packet("www.example.org", qid=5))
        assert DNSRecord.parse(out).header.id == 5
        assert s.server.stats["forwarded"] == 2
    finally:
        lt.run(s.server.stop())


def test_a_silent_or_lying_upstream_is_skipped(
    lt: LoopThread, upstreams: list[FakeUpstream]
) -> None:
    upstreams[0].mode = "wrong_id"  # a spoofed answer must not be taken
    s = forwarding_server(lt, upstreams, timeout=0.8)
    try:
        r = s.query("www.example.com")
        assert answers(r) == [("www.example.com.", "A", "192.0.2.0")]
        assert upstreams[1].udp_queries == 1
        upstreams[0].mode = "silent"
        assert answers(s.query("b.example.com"))
    finally:
        lt.run(s.server.stop())


def test_servfail_when_every_upstream_times_out(
    lt: LoopThread, upstreams: list[FakeUpstream]
) -> None:
    for u in upstreams:
        u.mode = "silent"
    s = forwarding_server(lt, upstreams, timeout=0.3)
    try:
        t0 = time.monotonic()
        r = s.query("www.example.com", edns=1232)
        assert r.header.rcode == RCODE.SERVFAIL and str(r.q.qname) == "www.example.com."
        assert opt_of(r) is not None
        assert time.monotonic() - t0 < 2.5
        assert s.server.stats["forward_failed"] == 1
        [out] = s.tcp(packet("x.example.com"))
        assert DNSRecord.parse(out).header.rcode == RCODE.SERVFAIL
    finally:
        lt.run(s.server.stop())


def test_servfail_when_nothing_listens_upstream(lt: LoopThread) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    server = DnsServer(make_zone(), upstreams=[("127.0.0.1", dead_port)], timeout=0.5)
    lt.run(server.start([("127.0.0.1", 0)]))
    s = Srv(lt, server)
    try:
        assert s.query("www.example.com").header.rcode == RCODE.SERVFAIL
    finally:
        lt.run(server.stop())


def test_big_forwarded_answers_truncate_over_udp_and_come_whole_over_tcp(
    lt: LoopThread, upstreams: list[FakeUpstream]
) -> None:
    upstreams[0].records = 80  # ~1.3 KB
    s = forwarding_server(lt, upstreams)
    try:
        r = s.query("big.example.com")  # no EDNS: 512 bytes at most
        assert r.header.tc == 1 and r.rr == []
        r = s.query("big.example.com", edns=4096)  # capped at our 1232
        assert r.header.tc == 1 and opt_of(r) is not None
        upstreams[0].records = 30  # ~ 0.5 KB: over 512, under 1232
        r = s.query("mid.example.com", edns=1232)
        assert r.header.tc == 0 and len(r.rr) == 30
        assert s.query("mid.example.com").header.tc == 1
        upstreams[0].records = 80
        [out] = s.tcp(packet("big.example.com"))
        assert len(DNSRecord.parse(out).rr) == 80
        upstreams[0].mode = "tc"  # the upstream truncates: a TCP client's query goes TCP
        [out] = s.tcp(packet("huge.example.com"))
        assert len(DNSRecord.parse(out).rr) == 80 and upstreams[0].tcp_queries == 1
    finally:
        lt.run(s.server.stop())


def test_default_upstreams_skip_loopback(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\nnameserver 127.0.0.53\nnameserver ::1\nsearch example\n"
        "nameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\n"
        "nameserver 198.51.100.1\nnameserver 198.51.100.2\n"
    )
    assert default_upstreams(str(conf)) == [
        ("192.0.2.53", 53), ("fe80::1%eth0", 53), ("198.51.100.1", 53),
    ]  # fmt: skip
    assert default_upstreams(str(tmp_path / "missing")) == []


# ------------------------------------------------------------------- hostile input

VALID = [
    packet("alpha.mesh.internal"),
    packet("web.prod.mesh.internal", "AAAA", edns=1232, do=True),
    packet("2.0.200.10.in-addr.arpa", "PTR"),
    packet("nope.mesh.internal", edns=512),
    packet("example.com"),
]


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf)


hostile = st.one_of(
    st.binary(max_size=600),
    st.builds(
        mutate,
        st.sampled_from(VALID),
        st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=6),
        st.none() | st.integers(0, 80),
    ),
)


def check_response(data: bytes, out: object, server: DnsServer, drops_before: int) -> None:
    drops = sum(v for k, v in server.stats.items() if k.startswith("dropped_"))
    if out is None:
        assert drops == drops_before + 1
        return
    if not isinstance(out, bytes):
        return  # a forward: awaited by the transport
    assert out[:2] == data[:2] and out[2] & 0x80  # same ID, QR set
    assert len(out) >= 12


HANDLER = DnsServer(make_zone(), upstreams=[("127.0.0.1", 9)], forward=True)


@given(hostile)
@settings(max_examples=600, deadline=None)
def test_handle_never_raises_on_hostile_input(data: bytes) -> None:
    server = HANDLER
    for tcp in (False, True):
        drops = sum(v for k, v in server.stats.items() if k.startswith("dropped_"))
        out = server.handle(data, tcp)
        check_response(data, out, server, drops)
        if isinstance(out, bytes) and not tcp:
            assert len(out) <= max(512, MAX_UDP_PAYLOAD)
    assert server.stats["dropped_internal_error"] == 0


@given(st.lists(hostile, min_size=1, max_size=20))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_garbage_over_udp_never_stops_the_server(srv: Srv, packets: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in packets:
            s.sendto(p, srv.addr)
    r = srv.query("alpha.mesh.internal")  # still serving, in order after the garbage
    assert answers(r) == [("alpha.mesh.internal.", "A", "10.200.0.1")]
    assert srv.server.stats["dropped_internal_error"] == 0


@given(st.lists(hostile, min_size=1, max_size=5), st.integers(0, 3))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_garbage_over_tcp_never_stops_the_server(srv: Srv, frames: list[bytes], how: int) -> None:
    # The server may hang up on garbage at any point: sending into a closed socket is fine.
    with socket.create_connection(srv.addr, timeout=3) as s, contextlib.suppress(OSError):
        if how == 0:  # well-framed garbage, then a real query on the same connection
            for f in frames:
                s.sendall(struct.pack("!H", len(f)) + f)
        elif how == 1:  # a length prefix promising more than is sent, then close
            s.sendall(struct.pack("!H", 65_535) + frames[0])
        elif how == 2:  # raw bytes with no framing
            s.sendall(b"".join(frames))
        else:  # a zero length
            s.sendall(b"\x00\x00")
    r = DNSRecord.parse(srv.tcp(packet("beta.mesh.internal"))[0])
    assert answers(r) == [("beta.mesh.internal.", "A", "10.200.0.2")]
    assert srv.server.stats["dropped_internal_error"] == 0


def test_responses_and_runts_are_dropped_and_counted(srv: Srv) -> None:
    response = bytearray(packet("alpha.mesh.internal"))
    response[2] |= 0x80
    assert srv.udp(bytes(response), timeout=0.3) is None
    assert srv.udp(b"\x01\x02\x03", timeout=0.3) is None
    assert srv.udp(b"", timeout=0.3) is None  # an empty datagram does not stop the thread
    assert srv.server.stats["dropped_not_a_query"] == 1
    assert srv.server.stats["dropped_short"] == 2
    garbage = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff"
    r = srv.udp(garbage)
    assert r is not None and r[:2] == b"\x12\x34" and r[3] & 0x0F == RCODE.FORMERR


# ------------------------------------------------------------- the answer cache

cache_names = st.sampled_from(
    [
        "alpha.mesh.internal", "web.prod.mesh.internal", "prod.mesh.internal",
        "nope.mesh.internal", "mesh.internal", "leader.mesh.internal",
        "1.0.200.10.in-addr.arpa", "0.200.10.in-addr.arpa", "200.10.in-addr.arpa",
        f"{LONG_HOST}.mesh.internal", "example.com",
    ]
)  # fmt: skip
qtypes = st.sampled_from(["A", "AAAA", "PTR", "SOA", "NS", "MX", "ANY", "TXT"])


CACHE_ZONE = make_zone()


def spell(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if flips[i % len(flips)] else c for i, c in enumerate(name))


@given(
    cache_names, qtypes, st.lists(st.booleans(), min_size=1, max_size=8),
    st.lists(st.booleans(), min_size=1, max_size=8), st.none() | st.integers(0, 5000),
    st.booleans(), st.integers(0, 65535), st.booleans(), st.booleans(),
)  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_cached_answers_equal_fresh_ones(
    name: str, qtype: str, flips1: list[bool], flips2: list[bool], edns: int | None,
    do: bool, qid: int, rd: bool, tcp: bool,
) -> None:  # fmt: skip
    """The byte-patched fast path gives what the full path gives: the same header and
    question bytes, the same records (names compressed against the question may differ
    in case: a cached answer was built from the lower-case spelling)."""
    warm = DnsServer(CACHE_ZONE, forward=False)
    warm.handle(packet(spell(name, flips1), qtype, edns=edns, do=do, qid=qid ^ 0xFFFF), tcp)
    query = bytearray(packet(spell(name, flips2), qtype, edns=edns, do=do, qid=qid))
    query[2] = (query[2] & 0xFE) | int(rd)
    fresh = DnsServer(CACHE_ZONE, forward=False).handle(bytes(query), tcp)
    cached = warm.handle(bytes(query), tcp)
    assert isinstance(fresh, bytes) and isinstance(cached, bytes)
    qend = len(query) - (11 if edns is not None else 0)
    assert cached[:qend] == fresh[:qend]
    assert str(DNSRecord.parse(cached)).lower() == str(DNSRecord.parse(fresh)).lower()


def test_byte_encoded_answers_equal_dnslib_answers() -> None:
    """Answers the server encodes itself (first query of a name) parse to exactly what
    the dnslib path answers: header bits, rcode, question spelling, every section."""
    view = make_zone()
    names = {str(r["name"]) for r in view.rows()}
    names |= {"nope.mesh.internal.", "prod.mesh.internal.", "x.1.0.200.10.in-addr.arpa."}
    names |= {"ALPHA.Mesh.Internal.", "Web.PROD.mesh.internal."}
    for forward in (False, True):
        fast = DnsServer(view, upstreams=[("192.0.2.1", 53)], forward=forward)
        for name in sorted(names):
            for qtype in ("A", "AAAA", "PTR", "MX", "TXT"):
                for edns, do in ((None, False), (1232, False), (4096, True)):
                    q = packet(name, qtype, edns=edns, do=do, qid=len(name))
                    q = q[:2] + bytes((q[2] | 0x01, q[3] | 0x10)) + q[4:]  # RD and CD set
                    before = fast.stats["encoded"] + fast.stats["cache_hits"]
                    ours = fast.handle(q)
                    assert isinstance(ours, bytes)  # encoded, or cached under another spelling:
                    after = fast.stats["encoded"] + fast.stats["cache_hits"]
                    assert after == before + 1, (name, qtype)  # never the dnslib path
                    theirs = DnsServer(view, upstreams=[("192.0.2.1", 53)], forward=forward)
                    ref = theirs._slow(q, False, None)
                    assert isinstance(ref, bytes)
                    a, b = DNSRecord.parse(ours), DNSRecord.parse(ref)
                    assert str(a) == str(b), (name, qtype, edns)
                    assert a.header.bitmap == b.header.bitmap and a.header.id == b.header.id
                    assert fast.handle(q) == ours  # the cached copy, patched the same way


# ------------------------------------------------------------- the UDP threads


def dns_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("meshd-dns-")]


def test_udp_threads_start_and_stop_leaving_nothing_behind(lt: LoopThread) -> None:
    before = set(dns_threads())
    server = DnsServer(make_zone(), forward=False)
    lt.run(server.start([("127.0.0.1", 0), ("127.0.0.1", 0)]))
    ours = set(dns_threads()) - before
    assert len(ours) == 2 and all(t.daemon for t in ours)
    socks = [t.sock for t in server._udp]
    ports = [port for _, port in server.bound]
    for port in ports:
        client = Srv(lt, server)
        client.addr = ("127.0.0.1", port)
        assert answers(client.query("alpha.mesh.internal"))[0][2] == "10.200.0.1"
    t0 = time.monotonic()
    lt.run(server.stop())
    assert time.monotonic() - t0 < 5
    assert not any(t.is_alive() for t in ours)
    assert all(s.fileno() == -1 for s in socks)
    assert server.stats["queries_udp"] == 2  # the threads' counts outlive them
    for port in ports:  # the ports are free again
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port))


@given(st.one_of(hostile, st.sampled_from(VALID)), st.integers(0, 65535))
@settings(max_examples=300, deadline=None)
def test_the_threads_cache_answers_exactly_what_the_loop_answers(data: bytes, qid: int) -> None:
    """DnsServer.cached (the UDP threads' path) gives the loop's answer or nothing,
    also for a second query of the same bytes with another ID (the exact cache)."""
    server = DnsServer(CACHE_ZONE, forward=False)
    first = server.handle(data)
    second = qid.to_bytes(2, "big") + data[2:]
    for query in (data, second, data):
        out = server.cached(query)
        if out is not None:
            assert isinstance(first, bytes)
            assert out == server.handle(query)
    assert server.stats["dropped_internal_error"] == 0


def test_the_threads_never_answer_for_an_older_version() -> None:
    """The threads' path answers a query read after an update from that update on:
    from a new cache of the new version, never from the old one."""
    view = make_zone()
    server = DnsServer(view, forward=False)
    q = packet("beta.mesh.internal")
    counts: Counter[str] = Counter()
    first = server.cached(q, counts)  # encoded by the thread's path, no loop involved
    assert first is not None and answers(DNSRecord.parse(first))[0][2] == "10.200.0.2"
    assert server.cached(q, counts) == first and counts == {"encoded": 1, "cache_hits": 1}
    old = server._answers
    view.update(Member(nid(2), "beta", "db", 2, 2.0), MemberState.DEAD)
    out = server.cached(q, counts)
    assert out is not None and DNSRecord.parse(out).header.rcode == RCODE.NXDOMAIN
    assert server._answers is not old and out == server.handle(q)
    assert counts["encoded"] == 2
    server.view = make_zone()  # another view, maybe at the same version number
    again = server.cached(q, counts)
    assert again is not None and again == first and counts["encoded"] == 3


def test_the_threads_see_each_update_while_the_loop_makes_them() -> None:
    """A thread calling DnsServer.cached as fast as it can while this thread flips a
    member between alive and dead: every answer is one of the two states, and every
    call made after a flip returned sees that flip (the version check, no locks)."""
    view = make_zone()
    server = DnsServer(view, forward=False)
    q = packet("beta.mesh.internal")
    alive = Member(nid(2), "beta", "db", 2, 2.0)
    # seq is odd while an update runs: a call that began and ended at one even seq
    # overlapped no update, so it must give the state that update left
    state = {"dead": False, "seq": 0}
    stop = threading.Event()
    bad: list[str] = []
    checked = [0]

    def reader() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            seq, dead = state["seq"], state["dead"]
            out = server.cached(q)
            if out is None:
                bad.append("no answer")
                continue
            if seq % 2 == 0 and state["seq"] == seq:
                checked[0] += 1
                if (out[3] & 0x0F) != (NXDOMAIN if dead else 0):
                    bad.append(f"seq {seq}: rcode {out[3] & 0x0F}, dead={dead}")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(400):
            state["seq"] += 1
            view.update(alive, MemberState.DEAD if i % 2 == 0 else MemberState.ALIVE)
            state["dead"] = i % 2 == 0
            state["seq"] += 1
            time.sleep(0.0005)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive() and checked[0] > 400
    assert bad == []


def test_port_zero_tries_another_port_when_tcp_has_the_udp_one(
    lt: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy host another program's TCP socket may hold the ephemeral port the
    UDP socket got: the server takes another rather than failing."""
    real = meshd.dns.bind_socket
    refused: list[int] = []

    def flaky(host: str, port: int, kind: int) -> socket.socket:
        if kind == socket.SOCK_STREAM and not refused:
            refused.append(port)
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return real(host, port, kind)

    monkeypatch.setattr(meshd.dns, "bind_socket", flaky)
    server = DnsServer(make_zone(), forward=False)
    [(_, port)] = lt.run(server.start([("127.0.0.1", 0)]))
    try:
        assert refused and port != refused[0]
        [out] = Srv(lt, server).tcp(packet("alpha.mesh.internal"))
        assert answers(DNSRecord.parse(out))[0][2] == "10.200.0.1"
    finally:
        lt.run(server.stop())


def test_long_queries_are_answered_but_not_kept_whole() -> None:
    """EDNS padding makes a plain query long: the exact cache (keyed by the whole
    query) does not keep it, so hostile padding cannot fill memory."""
    server = DnsServer(make_zone(), forward=False)
    q = packet("alpha.mesh.internal", edns=1232)
    padded = q[:-2] + (4 + 3000).to_bytes(2, "big") + b"\x00\x0c" + (3000).to_bytes(2, "big")
    padded += b"\x00" * 3000  # an OPT with a 3,000-byte padding option (RFC 7830)
    assert server.handle(padded) is not None  # the loop answers it, and caches the template
    out = server.cached(padded)
    assert out is not None and out == server.handle(padded)
    assert answers(DNSRecord.parse(out)) == [("alpha.mesh.internal.", "A", "10.200.0.1")]
    assert len(server._answers.exact) == 0
    assert server.cached(q) is not None and len(server._answers.exact) == 1


def test_updates_are_seen_at_once_while_the_cache_is_hammered(srv: Srv) -> None:
    """A client thread keeps beta's answer hot in the cache while the loop toggles
    beta: every query sent after an update returns sees that update, and every answer
    in between is one of the two states."""
    beta = packet("beta.mesh.internal", qid=1)
    stop = threading.Event()
    seen: Counter[str] = Counter()
    bad: list[bytes] = []
    running = threading.Event()

    def hammer() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                s.sendto(beta, srv.addr)
                try:
                    raw = s.recv(4096)
                except TimeoutError:
                    continue
                running.set()
                r = DNSRecord.parse(raw)
                if r.header.rcode == RCODE.NXDOMAIN:
                    seen["nx"] += 1
                elif answers(r) == [("beta.mesh.internal.", "A", "10.200.0.2")]:
                    seen["a"] += 1
                else:
                    bad.append(raw)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    assert running.wait(10)
    member = Member(nid(2), "beta", LONG_HOST, 2, 2.0)
    try:
        for i in range(40):
            state = MemberState.DEAD if i % 2 == 0 else MemberState.ALIVE
            srv.lt.run(lambda st=state: srv.zone.update(member, st))  # type: ignore[misc]
            r = srv.query("beta.mesh.internal")
            if state is MemberState.DEAD:
                assert r.header.rcode == RCODE.NXDOMAIN, i
            else:
                assert answers(r) == [("beta.mesh.internal.", "A", "10.200.0.2")], i
    finally:
        stop.set()
        thread.join(5)
    assert not bad and seen["nx"] + seen["a"] > 0
    assert srv.server.stats["dropped_internal_error"] == 0


def test_misses_wait_for_a_busy_loop_up_to_a_bound(srv: Srv) -> None:
    """While the event loop is busy the thread queues what only the loop answers
    (here out-of-zone names, REFUSED) up to UDP_PENDING_MAX; more are dropped and
    counted; names in the zone are still answered, cached or not."""
    hot = packet("alpha.mesh.internal", qid=3)
    assert srv.udp(hot) is not None  # now cached
    busy, free = threading.Event(), threading.Event()

    def block() -> None:
        busy.set()
        time.sleep(2.0)
        free.set()

    srv.lt.loop.call_soon_threadsafe(block)
    assert busy.wait(5)
    sent = UDP_PENDING_MAX + 300
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(0.5)
        for i in range(sent):
            s.sendto(packet(f"nx{i}.example", qid=i), srv.addr)
            if i % 100 == 0:
                time.sleep(0.002)  # let the thread keep up with the socket
        new = packet("never-asked.mesh.internal", qid=4)
        for q in (hot, new):  # answered by the thread while the loop still sleeps
            s.sendto(q, srv.addr)
            while (out := s.recv(4096))[:2] != q[:2]:
                pass
        assert DNSRecord.parse(out).header.rcode == RCODE.NXDOMAIN
        assert not free.is_set()
        srv.lt.run(lambda: None)  # the loop is free again: it answers what waited
        got = 0
        with contextlib.suppress(TimeoutError):
            while True:
                s.recv(4096)
                got += 1
    stats = srv.server.stats
    assert stats["dropped_loop_busy"] >= 1
    assert 0 < got <= UDP_PENDING_MAX
    assert got + stats["dropped_loop_busy"] <= sent
    assert answers(srv.query("beta.mesh.internal"))  # the loop caught up
