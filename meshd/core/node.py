"""A cluster member's protocol core: admits joiners, serves control requests, holds the view.

Sans-I/O in the aioquic style: the agent feeds ``receive(data, addr, now)`` and
``handle_timer(now)`` and carries out ``datagrams_to_send()``; ``next_event()``
reports what happened. Persistent state changes raise ``dirty``; the agent must
write ``snapshot()`` *before* sending the datagrams that follow from it (a join
reply hands out an address, and a crash after the reply but before the write
would hand it out twice).

Control traffic between members (token use, lease requests, releases) rides in
SEALED packets and is additionally signed by the sender's node key; because node
ids are hashes of keys, the receiver authenticates the sender without a lookup.

Membership (SWIM + Lifeguard, :mod:`meshd.core.membership`) runs inside the node
over the same sealed channel. The node is the membership's owner: a member exists
only once its signed record has been verified (``learn_unknown=False``); records
and lease changes spread as piggyback items and are re-broadcast only after they
verified; push-pull reports records a partner has newer and the node fetches them.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from meshd.core import join, wire
from meshd.core.admission import (
    Admission,
    Lease,
    TokenClaims,
    TokenLedger,
    cluster_id,
    issue_admission,
    sign_lease,
    token_secret,
)
from meshd.core.crypto import NODE_ID_LEN, PUB_LEN, SignedBlob, SigningKey, WireGuardKey, node_id
from meshd.core.ipam import AddressPlan, BlockAllocator, IpamError, LeaseTable, NoAvailableIps
from meshd.core.join import JoinErrorCode, JoinGrant
from meshd.core.membership import (
    ACK,
    NACK,
    PING,
    PROFILES,
    MemberAddressChanged,
    MemberJoined,
    MemberRemoved,
    Membership,
    MemberState,
    MemberStateChanged,
    Piggyback,
    Refuted,
    SyncNeeded,
    Timing,
)
from meshd.core.paths import GossipPaths, Observed, PathChanged, PathPolicy
from meshd.core.pull import MAX_RECORD_REQUEST, RecordPull, announcement
from meshd.core.records import DEFAULT_WG_PORT, Merge, PeerRecord, RecordStore, sign_record
from meshd.core.wire import Addr, DropReason, Keyring, Kind, RandomBytes, WireError

CONTROL_DOMAIN: Final = b"meshd control v1"
COOKIE_PERIOD: Final = 30.0
REPLY_CACHE_TTL: Final = 120.0
REPLY_CACHE_SIZE: Final = 1_024
#: Control requests are retried after 0.5 s, doubling up to 2 s, 10 attempts in all
#: (about 17 s): every op is idempotent, so a retry costs a datagram, and under 20%
#: loss a round trip fails 36% of the time (six attempts to a 16 s backoff made a
#: seed's joiners time out before its block lease came).
CONTROL_RTO: Final = 0.5
CONTROL_MAX_RTO: Final = 2.0
CONTROL_ATTEMPTS: Final = 10
PUSH_BUDGET: Final = 1_200
MAX_GRANT_BYTES: Final = join.CHUNK_DATA * 200
PARKED_MAX: Final = 256
NO_BLOCK_HOLDOFF: Final = 10.0
#: Largest sealed gossip datagram: it must cross any IPv6 path inside the overlay too.
#: 1,280 (IPv6 minimum MTU) - 40 (IPv6) - 8 (UDP) - 32 (WireGuard header and tag) leaves
#: 1,200 for the inner packet, minus its own IPv6 and UDP headers: 1,152.
GOSSIP_MTU: Final = 1_152
#: ``{"t": "swim", "m": ...}`` around a membership message.
SWIM_WRAP: Final = 10
#: Body budget handed to the membership core.
SWIM_BUDGET: Final = GOSSIP_MTU - wire.SEALED_OVERHEAD - SWIM_WRAP


class Op(enum.Enum):
    TOKEN_USE = "tok_use"
    LEASE = "lease"
    RELEASE = "release"
    RESPONSE = "rsp"


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class MemberUpdated:
    record: PeerRecord
    merge: Merge


@dataclass(frozen=True)
class Admitted:
    node_id: bytes
    name: str
    offset: int


@dataclass(frozen=True)
class LeaseChanged:
    lease: Lease


@dataclass(frozen=True)
class ControlFailed:
    op: str
    reason: str


@dataclass(frozen=True)
class LeaveFinished:
    acknowledged: bool


Event = (
    MemberUpdated
    | Admitted
    | LeaseChanged
    | ControlFailed
    | LeaveFinished
    | MemberJoined
    | MemberStateChanged
    | MemberRemoved
    | Refuted
    | PathChanged
)


@dataclass
class _Pending:
    """A signed control request awaiting a signed response, retried with backoff."""

    op: Op
    target: bytes
    addr: Addr
    packet: bytes
    attempts: int
    next_try: float
    context: dict[str, Any]


@dataclass
class NodeConfig:
    """What the node needs to know about itself that is not a key."""

    name: str
    hostname: str | None
    endpoints: list[str]
    zone: str
    version: str
    #: WireGuard listen port published in the record (0: no WireGuard interface).
    wg_port: int = DEFAULT_WG_PORT


class Node:
    """One member. Construct with :meth:`create_cluster` (init) or :meth:`from_grant` (join)
    or directly from a snapshot (restart)."""

    def __init__(
        self,
        *,
        sign: SigningKey,
        wg: WireGuardKey,
        ca_public: bytes,
        ca: SigningKey | None,
        keyring: Keyring,
        token_key: bytes,
        plan: AddressPlan,
        config: NodeConfig,
        leader: bytes,
        admission: SignedBlob,
        seq: int,
        now: float,
        random_bytes: RandomBytes,
        allocator: BlockAllocator | None = None,
        my_leases: Iterable[SignedBlob] = (),
        lease_table: LeaseTable | None = None,
        ledger: TokenLedger | None = None,
        records: Iterable[SignedBlob] = (),
        leases: Iterable[SignedBlob] = (),
        left: bool = False,
        timing: Timing | None = None,
        incarnation: int = 0,
        view: dict[bytes, tuple[MemberState, int]] | None = None,
    ) -> None:
        self.sign = sign
        self.wg = wg
        self.ca_public = ca_public
        self.ca = ca
        self.keyring = keyring
        self.token_key = token_key
        self.plan = plan
        self.config = config
        self.leader = leader
        self.left = left
        self._rand = random_bytes
        self.store = RecordStore(ca_public, plan)
        self.allocator = allocator or BlockAllocator(plan)
        self.lease_table = (
            lease_table
            if lease_table is not None
            else (LeaseTable(plan) if ca is not None else None)
        )
        self.ledger = ledger or TokenLedger()
        self._my_leases: dict[int, Lease] = {}
        self._cookie_secret = random_bytes(32)
        self._out: list[tuple[bytes, Addr]] = []
        self._events: list[Event] = []
        self._pending: dict[bytes, _Pending] = {}
        self._replies: OrderedDict[tuple[bytes, bytes], tuple[float, list[bytes]]] = OrderedDict()
        #: The issuer's verdicts on (token id, joiner), kept until the token expires.
        self._token_ok: dict[tuple[bytes, bytes], tuple[float, str | None]] = {}
        #: Join requests waiting on a control round trip (token use, block lease),
        #: finished as soon as the answer arrives instead of at the joiner's next retry.
        self._parked: OrderedDict[bytes, tuple[bytes, Addr]] = OrderedDict()
        self._no_block_until = 0.0
        self._leaving = False
        #: Critical state changed (allocations, token uses, own leases, seq): persist
        #: before sending anything. ``view_dirty``: only the cached view changed.
        self.dirty = False
        self.view_dirty = False
        self.drops: dict[DropReason, int] = {}
        self.admitted = 0
        timing = timing or PROFILES["lan"]
        if timing.max_packet > SWIM_BUDGET:
            timing = dataclasses.replace(timing, max_packet=SWIM_BUDGET)
        self.swim = Membership(
            self.sign.node_id,
            _addr(config.endpoints[0]),
            timing,
            random.Random(int.from_bytes(random_bytes(16), "big")),
            now,
            incarnation,
            learn_unknown=False,
        )
        #: Overlay or bootstrap channel per member (meshd/core/paths.py).
        self.paths = GossipPaths(PathPolicy.for_probes(timing.probe_interval, timing.probe_timeout))
        #: Time of the latest input: outputs are stamped with it (no clock is read here).
        self._now = now
        #: Records asked for, oldest request first: node id -> (seq announced, when
        #: asked, whom, requests so far).
        self._pull = RecordPull()
        #: Persisted SWIM states applied as the restored records are vouched for.
        self._restored = view or {}
        #: While the constructor replays persisted or granted state nothing is re-gossiped.
        self._restoring = True
        for blob in my_leases:
            lease = self.store.verify_lease(blob)
            self._my_leases[lease.block] = lease
            self.store.offer_lease(blob)
        for blob in leases:
            self._count(self._offer_lease, blob)
        self.seq = seq
        self._admission_blob = admission
        self.record = self._publish(now)  # verifies the chain of our own admission too
        self.admission: Admission = self.record.admission
        self.swim.self_version = self.seq
        if left:
            self.swim.leave(now)
        for blob in records:
            self._count(self._offer_record, blob, now)
        self._restored = {}
        self._restoring = False
        self._swim_events(now)
        self._events.clear()  # restoring the view is not news
        self.view_dirty = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def create_cluster(
        cls,
        *,
        sign: SigningKey,
        wg: WireGuardKey,
        ca: SigningKey,
        keyring: Keyring,
        token_key: bytes,
        plan: AddressPlan,
        config: NodeConfig,
        now: float,
        random_bytes: RandomBytes,
    ) -> Node:
        """``meshd init``: this node becomes CA holder and leader, leasing itself block 0."""
        table = LeaseTable(plan)
        table.grant(sign.node_id.hex(), ca.node_id.hex(), now)
        lease = sign_lease(ca, table.leases()[0].block, sign.public, now)
        allocator = BlockAllocator(plan, [lease.block])
        offset = allocator.assign(sign.node_id.hex())
        adm = issue_admission(sign, lease, sign.public, wg.public, offset, now)
        return cls(
            sign=sign, wg=wg, ca_public=ca.public, ca=ca, keyring=keyring, token_key=token_key,
            plan=plan, config=config, leader=sign.node_id, admission=adm.blob, seq=1, now=now,
            random_bytes=random_bytes, allocator=allocator, my_leases=[lease.blob],
            lease_table=table,
        )  # fmt: skip

    @classmethod
    def from_grant(
        cls,
        grant: JoinGrant,
        *,
        sign: SigningKey,
        wg: WireGuardKey,
        config: NodeConfig,
        now: float,
        random_bytes: RandomBytes,
    ) -> Node:
        """``meshd join`` succeeded: build the member from what the seed granted."""
        return cls(
            sign=sign, wg=wg, ca_public=grant.ca_public, ca=None,
            keyring=Keyring(list(grant.keyring)), token_key=grant.token_key, plan=grant.plan,
            config=dataclasses.replace(config, zone=grant.zone), leader=grant.leader,
            admission=grant.admission, seq=1, now=now, random_bytes=random_bytes,
            records=grant.records, leases=grant.leases,
        )  # fmt: skip

    # ------------------------------------------------------------------------ outputs

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        """Sealed datagrams and where to send them: a member's bootstrap address, or its
        overlay address while its tunnel carries gossip (:mod:`meshd.core.paths`)."""
        now = self._now
        out = [
            (data, self.paths.outbound(data, addr, now, probe=False)) for data, addr in self._out
        ]
        self._out = []
        for msg, addr in self.swim.messages_to_send():
            data = self._seal({"t": "swim", "m": msg})
            kind = msg.get("k")
            probe = kind == PING
            seq = msg.get("seq") if probe else None
            reply = kind in (ACK, NACK)
            dest = self.paths.outbound(data, addr, now, probe=probe, seq=seq, reply=reply)
            out.append((data, dest))
        return out

    def next_event(self) -> Event | None:
        while (ev := self.paths.next_event()) is not None:
            self._events.append(ev)
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        times = [p.next_try for p in self._pending.values()]
        for t in (self.swim.get_timer(), self.paths.get_timer()):
            if t is not None:
                times.append(t)
        times.extend(exp for exp, _ in self._token_ok.values())
        if (t := self._pull.next_retry()) is not None:
            times.append(t)
        if self._replies:
            times.append(next(iter(self._replies.values()))[0] + REPLY_CACHE_TTL)
        return min(times) if times else None

    # ------------------------------------------------------------------------- inputs

    def receive(self, data: bytes, addr: Addr, now: float) -> None:
        """Handle one datagram; malformed or unauthenticated input is counted and dropped.
        ``addr`` may be a member's overlay address: it is credited to the overlay path and
        replaced by the member's bootstrap address before the protocol sees it."""
        self._now = now
        addr = self.paths.inbound(addr, now)
        try:
            kind = wire.parse_header(data)
            if kind is Kind.SEALED:
                self._on_sealed(self.keyring.open(data), addr, now)
            elif kind is Kind.JOIN_REQUEST:
                self._on_join_request(data, addr, now)
            else:
                raise WireError(DropReason.UNEXPECTED, f"{kind.name} sent to a member")
        except WireError as exc:
            self.drops[exc.reason] = self.drops.get(exc.reason, 0) + 1
        self._swim_events(now)

    def handle_timer(self, now: float) -> None:
        self._now = now
        # Probes that went unanswered over a tunnel go again over the bootstrap channel
        # (the member is held down there, so datagrams_to_send routes them so).
        self._out.extend(self.paths.handle_timer(now))
        self.swim.handle_timer(now)
        self._pull.retry(now, self._held)
        self._swim_events(now)
        for rid, p in list(self._pending.items()):
            if p.next_try > now:
                continue
            if p.attempts >= CONTROL_ATTEMPTS:
                del self._pending[rid]
                self._control_failed(p, f"no answer from {p.addr[0]}:{p.addr[1]}")
                continue
            p.attempts += 1
            p.next_try = now + min(CONTROL_RTO * 2 ** (p.attempts - 1), CONTROL_MAX_RTO)
            self._out.append((p.packet, p.addr))
        while self._replies:
            key, (t, _) = next(iter(self._replies.items()))
            if t + REPLY_CACHE_TTL > now:
                break
            del self._replies[key]
        self.ledger.prune(now)
        for key in [k for k, (exp, _) in self._token_ok.items() if exp <= now]:
            del self._token_ok[key]

    # ------------------------------------------------------------------- user calls

    @property
    def is_leader(self) -> bool:
        return self.ca is not None

    def addresses(self) -> tuple[str, str]:
        v4, v6 = self.plan.address(self.admission.offset)
        return str(v4), str(v6)

    def announce(self, now: float, endpoints: list[str] | None = None) -> None:
        """(Re)publish this node's record (new seq) and push it to every known member."""
        self._now = now
        if endpoints is not None:
            self.config.endpoints = endpoints
        self.seq += 1
        self.record = self._publish(now)
        self.dirty = True
        self.swim.self_version = self.seq
        self._broadcast_record(self.record)
        self.swim.sync(now)  # catch up at once instead of within the interval

    def set_hostname(self, hostname: str | None, now: float) -> None:
        """Change the extra DNS name this node advertises and publish the new record."""
        self.config.hostname = hostname
        self.announce(now)

    def leave(self, now: float) -> None:
        """Release this node's address and blocks, then report :class:`LeaveFinished`."""
        self._now = now
        if self.is_leader and any(r.node_id != self.sign.node_id for r in self.store):
            raise ValueError(
                "the leader holds the cluster CA and cannot leave while other members exist"
            )
        self._leaving = True
        self.left = True
        self.dirty = True
        self.swim.leave(now)
        if self.is_leader:
            self._events.append(LeaveFinished(True))
            return
        issuer = self.admission.issuer
        if issuer == self.sign.node_id:
            self.allocator.release(self.sign.node_id.hex())
        else:
            self._request(issuer, Op.RELEASE, {"off": self.admission.offset}, now)
        blocks = sorted(self._my_leases)
        if blocks:
            asg = {
                k: v
                for k, v in self.allocator.assignments().items()
                if k != self.sign.node_id.hex()
            }
            self._request(self.leader, Op.RELEASE, {"blocks": blocks, "asg": asg}, now)
        if not self._pending:
            self._events.append(LeaveFinished(True))

    # ---------------------------------------------------------------------- snapshot

    def snapshot(self) -> dict[str, Any]:
        """The persistent, non-secret state, JSON-able (secrets live in key files)."""
        self.dirty = self.view_dirty = False
        return {
            "cluster": {
                "ca_public": self.ca_public.hex(),
                "plan": self.plan.to_dict(),
                "zone": self.config.zone,
                "leader": self.leader.hex(),
            },
            "node": {
                "id": self.sign.node_id.hex(),
                "name": self.config.name,
                "hostname": self.config.hostname,
                "endpoints": self.config.endpoints,
                "wg_port": self.config.wg_port,
                "version": self.config.version,
                "seq": self.seq,
                "admission": _blob_json(self._admission_blob),
                "left": self.left,
            },
            "allocator": self.allocator.to_dict(),
            "my_leases": [_blob_json(x.blob) for _, x in sorted(self._my_leases.items())],
            "lease_table": self.lease_table.to_list() if self.lease_table is not None else None,
            "tokens": self.ledger.to_dict(),
            "members": [_blob_json(r.blob) for r in self.store if r.node_id != self.sign.node_id],
            "leases": [_blob_json(x.blob) for x in self.store.leases()],
            "swim": {
                "incarnation": self.swim.incarnation,
                "view": {
                    v.node_id.hex(): [v.state.value, v.incarnation] for v in self.swim.members()[1:]
                },
            },
        }

    # ------------------------------------------------------------------ join serving

    def _on_join_request(self, data: bytes, addr: Addr, now: float) -> None:
        req = join.decode_request(data)
        if self.left:
            raise WireError(DropReason.UNEXPECTED, "this node has left")
        if not join.cookie_valid(self._cookie_secret, addr, req.cookie, now, COOKIE_PERIOD):
            cookie = join.make_cookie(self._cookie_secret, addr, int(now // COOKIE_PERIOD))
            self._out.append((join.encode_cookie(req.request_id, cookie), addr))
            return
        try:
            claims = TokenClaims.decode(req.claims_raw)
        except WireError:
            self._join_error(req, addr, JoinErrorCode.BAD_TOKEN, None)
            raise
        secret = token_secret(self.token_key, req.claims_raw)
        if claims.cluster != cluster_id(self.ca_public) or not req.authenticate(secret):
            self._join_error(req, addr, JoinErrorCode.BAD_TOKEN, None)
            raise WireError(DropReason.BAD_TOKEN, "join request fails token MAC or signature")
        cached = self._replies.get((req.joiner, req.reply_key))
        if cached is not None:  # a retry: same bytes, no second use, no second address
            self._out.extend((pkt, addr) for pkt in cached[1])
            return
        seed_eph = WireGuardKey(self._rand(32))
        join.exchange(seed_eph, req.reply_key)  # refuse a low-order key before spending anything
        if claims.expires <= now:
            self._join_error(req, addr, JoinErrorCode.EXPIRED, secret)
            return
        refusal = self._token_use(claims, req.joiner, now)
        if refusal is _Wait.WAIT:
            self._park(req.joiner, data, addr)
            return
        if refusal is not None:
            self._join_error(req, addr, _refusal_code(refusal), secret)
            return
        admission = self._admit(req, now)
        if admission is None:
            if now < self._no_block_until:
                self._join_error(req, addr, JoinErrorCode.NO_ADDRESSES, secret)
                return
            self._park(req.joiner, data, addr)
            self._join_error(req, addr, JoinErrorCode.TRY_AGAIN, secret)
            return
        packets = join.seal_reply(
            self._grant(admission).encode(),
            req.request_id,
            secret,
            req.reply_key,
            seed_eph,
        )
        self._replies[(req.joiner, req.reply_key)] = (now, packets)
        while len(self._replies) > REPLY_CACHE_SIZE:
            self._replies.popitem(last=False)
        self._out.extend((pkt, addr) for pkt in packets)
        self.admitted += 1
        self._events.append(Admitted(req.joiner, req.name, admission.offset))

    def _park(self, joiner: bytes, data: bytes, addr: Addr) -> None:
        self._parked[joiner] = (data, addr)
        while len(self._parked) > PARKED_MAX:
            self._parked.popitem(last=False)

    def _unpark(self, now: float) -> None:
        parked, self._parked = self._parked, OrderedDict()
        for data, addr in parked.values():
            self.receive(data, addr, now)

    def _join_error(
        self, req: join.JoinRequest, addr: Addr, code: JoinErrorCode, secret: bytes | None
    ) -> None:
        self._out.append((join.encode_error(req.request_id, code, secret), addr))

    def _token_use(self, claims: TokenClaims, joiner: bytes, now: float) -> str | _Wait | None:
        """None: allowed. str: refused. WAIT: asked the issuer; the joiner's retry will see."""
        if claims.issuer == self.sign.node_id:
            refusal = self.ledger.consume(claims, joiner, now)
            self.dirty = True
            return refusal
        key = (claims.token_id, joiner)
        if key in self._token_ok:
            return self._token_ok[key][1]
        if self.store.get(claims.issuer) is None:
            return _NOT_READY  # the issuer's record may still be on its way
        if not any(p.context.get("key") == key for p in self._pending.values()):
            self._request(
                claims.issuer,
                Op.TOKEN_USE,
                {"claims": claims.raw, "who": joiner},
                now,
                context={"key": key, "exp": claims.expires},
            )
        return _Wait.WAIT

    def _admit(self, req: join.JoinRequest, now: float) -> Admission | None:
        """Address from this node's own block; a new block (leader) or lease request if full."""
        who = req.joiner.hex()
        try:
            offset = self.allocator.assign(who)
        except NoAvailableIps:
            self._want_block(now)
            if self.allocator.free_count() == 0:
                return None
            offset = self.allocator.assign(who)
        lease = self._my_leases[self.plan.block_of_offset(offset)]
        self.dirty = True
        return issue_admission(self.sign, lease, req.sign_key, req.wg_key, offset, now)

    def _want_block(self, now: float) -> None:
        if self.lease_table is not None and self.ca is not None:
            try:
                lease = self._grant_block(self.sign.public, now)
            except IpamError as exc:  # every block of the plan is leased
                self._lease_refused(str(exc), now)
                return
            self._install_lease(lease, now)
        elif not any(p.op is Op.LEASE for p in self._pending.values()):
            self._request(self.leader, Op.LEASE, {"have": sorted(self._my_leases)}, now)

    def _lease_refused(self, reason: str, now: float) -> None:
        """No block to be had: joiners get a clear NO_ADDRESSES for a while, not a timeout."""
        self._no_block_until = now + NO_BLOCK_HOLDOFF
        self._events.append(ControlFailed(Op.LEASE.value, reason))

    def _grant_block(self, holder_key: bytes, now: float) -> Lease:
        assert self.lease_table is not None and self.ca is not None
        granted = self.lease_table.grant(node_id(holder_key).hex(), self.ca.node_id.hex(), now)
        lease = sign_lease(
            self.ca, granted.block, holder_key, now, self._next_lease_seq(granted.block)
        )
        self.store.offer_lease(lease.blob)
        self.dirty = True
        self._events.append(LeaseChanged(lease))
        return lease

    def _next_lease_seq(self, block: int) -> int:
        """The leader signed every lease of this block, so its view has the latest."""
        cur = self.store.lease(block)
        return cur.seq + 1 if cur is not None else 1

    def _install_lease(self, lease: Lease, now: float) -> None:
        if lease.holder != self.sign.node_id:
            return
        self._my_leases[lease.block] = lease
        if lease.block not in self.allocator.blocks():
            self.allocator.add_block(lease.block)
        self._offer_lease(lease.blob)
        self.dirty = True

    def _grant(self, admission: Admission) -> JoinGrant:
        records: list[SignedBlob] = [self.record.blob]
        size = len(self.record.blob.body)
        for rec in self.store:
            if rec.node_id == self.sign.node_id:
                continue
            size += len(rec.blob.body) + 80
            if size > MAX_GRANT_BYTES:
                break  # the rest arrives by record push / gossip
            records.append(rec.blob)
        return JoinGrant(
            admission=admission.blob,
            ca_public=self.ca_public,
            keyring=tuple(self.keyring.keys()),
            token_key=self.token_key,
            plan=self.plan,
            zone=self.config.zone,
            leader=self.leader,
            seed=self.sign.node_id,
            records=tuple(records),
            leases=tuple(x.blob for x in self.store.leases()),
        )

    # ---------------------------------------------------------------- sealed traffic

    def _seal(self, body: dict[str, Any]) -> bytes:
        return self.keyring.seal(wire.pack(body), self._rand)

    def _on_sealed(self, body: bytes, addr: Addr, now: float) -> None:
        m = wire.as_map(wire.unpack(body, max_array=256), "sealed body")
        t = wire.field(m, "t", str)
        if t == "swim":
            msg = wire.as_map(m.get("m"), "membership message")
            if msg.get("k") in (ACK, NACK) and isinstance(msg.get("seq"), int):
                self.paths.answered(msg["seq"])  # a probe got through, whichever path
            self.swim.receive(msg, addr, now)
        elif t == "rq":
            self._on_record_request(m, addr)
        elif t == "push":
            self._on_push(m, addr, now)
        elif t == "ctl":
            self._on_control(SignedBlob.from_wire(m.get("m"), "control"), addr, now)
        else:
            raise WireError(DropReason.UNEXPECTED, f"sealed message type {t!r}")

    def _push(
        self, records: list[SignedBlob], leases: list[SignedBlob], addr: Addr, *, ack: bool
    ) -> None:
        """Send records and leases in as many sealed datagrams as PUSH_BUDGET needs."""
        batch_r: list[list[bytes]] = []
        batch_l: list[list[bytes]] = []
        size = 0
        items = [(False, b) for b in records] + [(True, b) for b in leases]
        for i, (is_lease, blob) in enumerate(items):
            (batch_l if is_lease else batch_r).append(blob.to_wire())
            size += len(blob.body) + 72
            last = i == len(items) - 1
            if size >= PUSH_BUDGET or last:
                pkt = self._seal({"t": "push", "recs": batch_r, "leases": batch_l, "ack": ack})
                self._out.append((pkt, addr))
                batch_r, batch_l, size, ack = [], [], 0, False

    def _on_push(self, m: dict[str, Any], addr: Addr, now: float) -> None:
        for item in wire.as_list(wire.field(m, "leases", list), "leases", 64):
            self._count(lambda x: self._offer_lease(SignedBlob.from_wire(x, "lease")), item)
        for item in wire.as_list(wire.field(m, "recs", list), "records", 64):
            self._count(lambda x: self._offer_record(SignedBlob.from_wire(x, "rec"), now), item)
        if m.get("ack") is True:
            others = [r.blob for r in self.store if r.node_id != self.sign.node_id]
            self._push(
                [self.record.blob, *others], [x.blob for x in self.store.leases()], addr, ack=False
            )

    def _count(self, fn: Callable[..., None], *args: Any) -> None:
        """Apply one item of a batch; a bad item is counted, the rest still apply."""
        try:
            fn(*args)
        except WireError as exc:
            self.drops[exc.reason] = self.drops.get(exc.reason, 0) + 1

    def _offer_record(self, blob: SignedBlob, now: float) -> None:
        merge, rec = self.store.offer(blob, now)
        if rec.node_id == self.sign.node_id and merge is not Merge.UNCHANGED:
            self.store.merge_verified(self.record)  # our own record is only ever ours
            return
        if merge in (Merge.NEW, Merge.UPDATED):
            self.view_dirty = True
            self._events.append(MemberUpdated(rec, merge))
            # The block lease inside the admission replicates with the record.
            self._count(self._offer_lease, rec.admission.lease.blob)
            self._vouch(rec, now)
            self._pull.got(rec.node_id, rec.seq)
            if not self._restoring:
                self._broadcast_record(rec)

    def _vouch(self, rec: PeerRecord, now: float) -> None:
        """A verified record makes its node a member of the SWIM view."""
        if not rec.endpoints:
            return
        state, inc = self._restored.get(rec.node_id, (MemberState.ALIVE, 0))
        self.swim.add_member(rec.node_id, _addr(rec.endpoints[0]), inc, now, state)
        self.swim.set_version(rec.node_id, rec.seq)
        self._learn_paths(rec.node_id)

    def _learn_paths(self, nid: bytes) -> None:
        """Tell the path choice a member's bootstrap address (as the SWIM view holds it)
        and its overlay gossip address (overlay IPv4 at its advertised gossip port)."""
        rec, view = self.store.get(nid), self.swim.member(nid)
        if rec is None or view is None or not rec.endpoints:
            return
        v4, v6 = rec.addresses(self.plan)
        port = _addr(rec.endpoints[0])[1]
        self.paths.learn(nid, view.addr, (str(v4), port), (str(v6),))

    def _broadcast_record(self, rec: PeerRecord) -> None:
        """Announce a record we hold as (id, seq): about 30 bytes instead of about 620, so
        one datagram carries dozens of announcements; a member that lacks that version
        pulls the record from whoever announced it to it (one round trip per hop). Sent
        whole, 100 joins meant 1,200 full-size sends per node, a minute of gossip."""
        self.swim.broadcast(*announcement(rec.node_id, rec.seq))

    def _held(self, nid: bytes) -> int:
        """The version of ``nid``'s record we hold (0: none)."""
        rec = self.store.get(nid)
        return 0 if rec is None else rec.seq

    def _offer_lease(self, blob: SignedBlob) -> None:
        merge, lease = self.store.offer_lease(blob)
        if merge in (Merge.NEW, Merge.UPDATED):
            self.view_dirty = True
            self._events.append(LeaseChanged(lease))
            if self._restoring:
                return
            self.swim.broadcast(
                {"k": "lease", "l": blob.to_wire()}, b"l" + lease.block.to_bytes(4, "big")
            )

    # ------------------------------------------------------------------ membership

    def _swim_events(self, now: float) -> None:
        """Act on what the membership core reported; pass state changes on to the agent."""
        while (ev := self.swim.next_event()) is not None:
            if isinstance(ev, Piggyback):
                self._count(self._on_item, ev.item, ev.addr, now)
            elif isinstance(ev, SyncNeeded):
                self._pull.sync_needed(ev.addr, ev.node_ids, self._held, now)
            elif isinstance(ev, Refuted):
                self.dirty = True  # the new incarnation is on disk before it is sent
                self._events.append(ev)
            elif isinstance(ev, MemberRemoved):
                # The tombstone expired: forget the record too (push-pull brings it back
                # if the member is still around somewhere).
                if ev.node_id != self.leader and self.store.remove(ev.node_id) is not None:
                    self.view_dirty = True
                self.paths.forget(ev.node_id)
                self._events.append(ev)
            elif isinstance(ev, MemberAddressChanged):
                self._learn_paths(ev.node_id)
            elif isinstance(ev, MemberJoined | MemberStateChanged):
                self.view_dirty = True
                if isinstance(ev, MemberStateChanged) and ev.new in (
                    MemberState.DEAD,
                    MemberState.LEFT,
                ):
                    self.paths.down(ev.node_id)  # its tunnel is being removed
                self._events.append(ev)
        for addr, batch in self._pull.requests():
            self._out.append((self._seal({"t": "rq", "ids": batch}), addr))

    def _on_item(self, item: dict[str, Any], src: Addr | None, now: float) -> None:
        kind = item.get("k")
        if kind == "v":
            nid = wire.bin_field(item, "id", NODE_ID_LEN)
            seq = wire.int_field(item, "s")
            have = self.store.get(nid)
            if (have is None or have.seq < seq) and src is not None:
                self._pull.want(nid, seq, src, now)
        elif kind == "lease":
            self._offer_lease(SignedBlob.from_wire(item.get("l"), "lease"))
        else:
            raise WireError(DropReason.UNEXPECTED, f"piggyback item {kind!r}")

    def _on_record_request(self, m: dict[str, Any], addr: Addr) -> None:
        """A member asks for records we announced or that push-pull found we hold newer."""
        ids = wire.as_list(m.get("ids"), "record ids", MAX_RECORD_REQUEST)
        recs = []
        for nid in ids:
            if not isinstance(nid, bytes) or len(nid) != NODE_ID_LEN:
                raise WireError(DropReason.MALFORMED, "record request id")
            rec = self.store.get(nid)
            if rec is not None:
                recs.append(rec.blob)
        if recs:
            self._push(recs, [], addr, ack=False)

    def tunnel_report(
        self, nid: bytes, endpoint: str | None, last_handshake: float | None, now: float
    ) -> bool:
        """Input from the data plane: a member's tunnel as the device shows it (the
        endpoint it is seen from, its last handshake, wall-clock). Feeds the path choice
        and the observed endpoint; True if that endpoint changed."""
        self._now = now
        return self.paths.tunnel(nid, endpoint, last_handshake, now)

    def observed_endpoint(self, nid: bytes) -> Observed | None:
        """Where a member's tunnel was last seen from (a NAT-traversal candidate)."""
        return self.paths.observed(nid)

    def member_state(self, nid: bytes) -> tuple[MemberState, int] | None:
        """(state, incarnation) of a member in this node's SWIM view, None if not in it."""
        v = self.swim.member(nid)
        return None if v is None else (v.state, v.incarnation)

    # -------------------------------------------------------------- control messages

    def _request(
        self,
        target: bytes,
        op: Op,
        fields: dict[str, Any],
        now: float,
        context: dict[str, Any] | None = None,
    ) -> None:
        rec = self.store.get(target)
        if rec is None or not rec.endpoints:
            self._events.append(ControlFailed(op.value, f"member {target.hex()} is not known"))
            return
        rid = self._rand(8)
        packet = self._control_packet(op, rid, fields)
        addr = _addr(rec.endpoints[0])
        self._pending[rid] = _Pending(op, target, addr, packet, 1, now + CONTROL_RTO, context or {})
        self._out.append((packet, addr))

    def _control_packet(self, op: Op, rid: bytes, fields: dict[str, Any]) -> bytes:
        inner = {"op": op.value, "rid": rid, "from": self.sign.node_id, "sk": self.sign.public}
        blob = SignedBlob.sign(self.sign, CONTROL_DOMAIN, {**inner, **fields})
        return self._seal({"t": "ctl", "m": blob.to_wire()})

    def _on_control(self, blob: SignedBlob, addr: Addr, now: float) -> None:
        m = blob.fields("control")
        sk = wire.bin_field(m, "sk", PUB_LEN)
        sender = wire.bin_field(m, "from", NODE_ID_LEN)
        if sender != node_id(sk):
            raise WireError(DropReason.BAD_SIGNATURE, "control sender does not match its key")
        blob.check(sk, CONTROL_DOMAIN, "control")
        rid = wire.bin_field(m, "rid", 8)
        try:
            op = Op(wire.field(m, "op", str))
        except ValueError:
            raise WireError(DropReason.MALFORMED, "unknown control op") from None
        if op is Op.RESPONSE:
            self._on_response(rid, sender, m, now)
            return
        result: dict[str, Any]
        if op is Op.TOKEN_USE:
            result = self._serve_token_use(m, now)
        elif op is Op.LEASE:
            result = self._serve_lease(sk, m, now)
        else:
            result = self._serve_release(sender, m, now)
        self._out.append((self._control_packet(Op.RESPONSE, rid, result), addr))

    def _serve_token_use(self, m: dict[str, Any], now: float) -> dict[str, Any]:
        claims = TokenClaims.decode(wire.bin_field(m, "claims"))
        if claims.issuer != self.sign.node_id:
            return {"ok": False, "err": "this node did not issue the token"}
        refusal = self.ledger.consume(claims, wire.bin_field(m, "who", NODE_ID_LEN), now)
        self.dirty = True
        return {"ok": refusal is None, "err": refusal}

    def _serve_lease(self, requester_key: bytes, m: dict[str, Any], now: float) -> dict[str, Any]:
        """Grant a block, idempotently: the request lists the blocks the member holds
        (``have``), and a block leased to it that it does not list is one whose answer
        was lost (a retry, or a new request after the old one gave up): it gets that
        block again instead of another one."""
        if self.lease_table is None or self.ca is None:
            return {"ok": False, "err": "this node is not the leader"}
        if m.get("have") is not None:
            have = {b for b in wire.as_list(m["have"], "held blocks", 4096) if isinstance(b, int)}
            holder = node_id(requester_key)
            for held in self.lease_table.held_by(holder.hex()):
                lease = self.store.lease(held.block)
                if held.block not in have and lease is not None and lease.holder == holder:
                    return {"ok": True, "lease": lease.blob.to_wire()}
        try:
            lease = self._grant_block(requester_key, now)
        except IpamError as exc:
            return {"ok": False, "err": str(exc)}
        return {"ok": True, "lease": lease.blob.to_wire()}

    def _serve_release(self, sender: bytes, m: dict[str, Any], now: float) -> dict[str, Any]:
        who = sender.hex()
        if m.get("off") is not None and self.allocator.assignment(who) is not None:
            self.allocator.release(who)
            self.dirty = True
        blocks = wire.as_list(m.get("blocks", []), "blocks", 4096)
        if blocks and self.lease_table is not None and self.ca is not None:
            asg = wire.as_map(m.get("asg", {}), "assignments")
            refused = []
            for block in blocks:
                if not isinstance(block, int) or self.lease_table.holder_of(block) != who:
                    continue
                kept = {
                    k: v
                    for k, v in asg.items()
                    if isinstance(v, int) and _in_block(self.plan, v, block)
                }
                if kept:  # members still live there: the leader adopts the block
                    current = self.allocator.assignments()
                    if kept.keys() & current.keys():  # would move an address assigned here
                        refused.append(block)
                        continue
                    try:  # validate before touching anything: bad offsets change nothing
                        adopted = BlockAllocator(
                            self.plan, [*self.allocator.blocks(), block], {**current, **kept}
                        )
                    except IpamError:
                        refused.append(block)
                        continue
                    self.lease_table.release(block, who)
                    self.lease_table.grant_block(block, self.sign.node_id.hex(), who, now)
                    self.allocator = adopted
                    seq = self._next_lease_seq(block)
                    lease = sign_lease(self.ca, block, self.sign.public, now, seq)
                    self._my_leases[block] = lease
                else:
                    self.lease_table.release(block, who)
                    lease = sign_lease(self.ca, block, None, now, self._next_lease_seq(block))
                self._offer_lease(lease.blob)
            self.dirty = True
            if refused:
                return {"ok": False, "err": f"invalid assignments for blocks {refused}"}
        return {"ok": True}

    def _on_response(self, rid: bytes, sender: bytes, m: dict[str, Any], now: float) -> None:
        p = self._pending.get(rid)
        if p is None or p.target != sender:
            raise WireError(DropReason.UNEXPECTED, "response to no pending request")
        del self._pending[rid]
        ok = m.get("ok") is True
        err = m.get("err") if isinstance(m.get("err"), str) else None
        if p.op is Op.TOKEN_USE:
            verdict = None if ok else (err or "token refused")
            self._token_ok[p.context["key"]] = (p.context["exp"], verdict)
            self._unpark(now)
        elif p.op is Op.LEASE:
            if not ok:
                self._lease_refused(err or "lease refused", now)
                self._unpark(now)
                return
            lease = self.store.verify_lease(SignedBlob.from_wire(m.get("lease"), "lease"))
            self._install_lease(lease, now)
            self._unpark(now)
        elif (
            p.op is Op.RELEASE
            and self._leaving
            and not any(q.op is Op.RELEASE for q in self._pending.values())
        ):
            self._events.append(LeaveFinished(True))

    def _control_failed(self, p: _Pending, reason: str) -> None:
        if p.op is Op.TOKEN_USE:
            self._token_ok.pop(p.context["key"], None)
        self._events.append(ControlFailed(p.op.value, reason))
        if (
            p.op is Op.RELEASE
            and self._leaving
            and not any(q.op is Op.RELEASE for q in self._pending.values())
        ):
            self._events.append(LeaveFinished(False))

    # ------------------------------------------------------------------------ helpers

    def _publish(self, now: float) -> PeerRecord:
        """Sign our record at the current seq and make it the one in our own view."""
        blob = sign_record(
            self.sign,
            seq=self.seq,
            name=self.config.name,
            hostname=self.config.hostname,
            wg_key=self.wg.public,
            endpoints=self.config.endpoints,
            now=now,
            version=self.config.version,
            admission=self._admission_blob,
            wg_port=self.config.wg_port,
        )
        rec = self.store.verify(blob, now)
        self.store.remove(rec.node_id)
        self.store.merge_verified(rec)
        return rec


class _Wait(enum.Enum):
    WAIT = "wait"


_NOT_READY: Final = "the token's issuer is not known to this seed yet"


def _refusal_code(reason: str) -> JoinErrorCode:
    """Map a ledger refusal to the code the joiner sees."""
    if "used up" in reason:
        return JoinErrorCode.USED_UP
    if "expired" in reason:
        return JoinErrorCode.EXPIRED
    if reason == _NOT_READY:
        return JoinErrorCode.TRY_AGAIN
    return JoinErrorCode.REFUSED


def _addr(endpoint: str) -> Addr:
    """An endpoint from a verified record (already checked by ``wire.endpoints_field``)."""
    return wire.split_hostport(endpoint)


def _in_block(plan: AddressPlan, offset: int, block: int) -> bool:
    try:
        return plan.block_of_offset(offset) == block
    except IpamError:
        return False


def _blob_json(blob: SignedBlob) -> list[str]:
    return [blob.body.hex(), blob.signature.hex()]


def blob_from_json(obj: Any) -> SignedBlob:
    """Inverse of the snapshot's blob encoding; ValueError on anything else."""
    if not (isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str) for x in obj)):
        raise ValueError("expected [body hex, signature hex]")
    return SignedBlob(bytes.fromhex(obj[0]), bytes.fromhex(obj[1]))
