"""The join handshake over the bootstrap UDP channel: codec and the joiner's state machine.

::

    joiner                                   seed (any member)
      JOIN_REQUEST (no cookie)  ------------>
                                <------------  JOIN_COOKIE      (34 B, stateless)
      JOIN_REQUEST (cookie, signed, MACed) ->
                                <------------  JOIN_REPLY x n   (sealed to the joiner)
                                               or JOIN_ERROR

* The cookie proves the joiner can receive at its source address before the seed
  sends anything larger than the request (DTLS HelloVerifyRequest, RFC 6347
  4.2.1; QUIC Retry, RFC 9000 8.1), so a spoofed request cannot be amplified.
* The request is MACed with the token secret, which never crosses the wire, and
  signed with the joiner's node key, which proves it owns the identity it asks
  to have admitted.
* The reply is encrypted to an ephemeral X25519 key of the joiner with a key that
  also mixes in the token secret, so only this joiner can read it and only a real
  member (who can derive the secret) can have written it.
* A reply is cached per (joiner, ephemeral key): a retry after a lost reply gets
  the same bytes and never burns a second token use or address.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshd.core import wire
from meshd.core.admission import TokenClaims, cluster_id, parse_token, verify_admission
from meshd.core.crypto import (
    NODE_ID_LEN,
    PUB_LEN,
    SIG_LEN,
    SignedBlob,
    SigningKey,
    WireGuardKey,
    hkdf,
    mac,
    mac_ok,
    node_id,
    verify,
)
from meshd.core.ipam import AddressPlan, IpamError
from meshd.core.wire import Addr, DropReason, Kind, WireError

REQUEST_DOMAIN: Final = b"meshd join request v1"
REQUEST_ID_LEN: Final = 16
COOKIE_LEN: Final = 16
ERROR_MAC_LEN: Final = 16
MAX_REQUEST: Final = 2_048
CHUNK_DATA: Final = 1_150
MAX_CHUNKS: Final = 512
_CHUNK_HDR = struct.Struct("!HH")


class JoinErrorCode(enum.IntEnum):
    """Why a seed refused a join. Codes >= 64 are worth retrying elsewhere."""

    BAD_TOKEN = 1
    EXPIRED = 2
    USED_UP = 3
    WRONG_CLUSTER = 4
    REFUSED = 5
    BAD_REQUEST = 6
    NO_ADDRESSES = 7
    TRY_AGAIN = 64


ERROR_TEXT: Final = {
    JoinErrorCode.BAD_TOKEN: "the seed rejected the join token (wrong token or wrong cluster)",
    JoinErrorCode.EXPIRED: "the join token has expired",
    JoinErrorCode.USED_UP: "the join token has been used up",
    JoinErrorCode.WRONG_CLUSTER: "the join token belongs to a different cluster than the seed",
    JoinErrorCode.REFUSED: "the seed refused the join",
    JoinErrorCode.BAD_REQUEST: "the seed could not parse the join request",
    JoinErrorCode.NO_ADDRESSES: "the cluster has no free overlay addresses (every block is leased)",
    JoinErrorCode.TRY_AGAIN: "the seed is not ready to admit yet",
}


# ----------------------------------------------------------------------------- request


@dataclass(frozen=True)
class JoinRequest:
    """A parsed (not yet authenticated) join request."""

    request_id: bytes
    cookie: bytes
    claims_raw: bytes
    reply_key: bytes
    sign_key: bytes
    wg_key: bytes
    name: str
    hostname: str | None
    endpoints: tuple[str, ...]
    signed_part: bytes
    signature: bytes
    tag: bytes

    @property
    def joiner(self) -> bytes:
        return node_id(self.sign_key)

    def authenticate(self, secret: bytes) -> bool:
        """MAC (token secret) then signature (joiner's key); both must hold."""
        return mac_ok(secret, self.signed_part + self.signature, self.tag) and verify(
            self.sign_key, REQUEST_DOMAIN, self.signed_part, self.signature
        )


def encode_request(
    *,
    request_id: bytes,
    cookie: bytes,
    claims_raw: bytes,
    secret: bytes,
    reply_key: bytes,
    sign: SigningKey,
    wg_key: bytes,
    name: str,
    hostname: str | None,
    endpoints: Sequence[str],
) -> bytes:
    signed_part = wire.header(Kind.JOIN_REQUEST) + wire.pack(
        {
            "rid": request_id,
            "ck": cookie,
            "tok": claims_raw,
            "eph": reply_key,
            "sk": sign.public,
            "wg": wg_key,
            "name": name,
            "host": hostname,
            "ep": list(endpoints)[:8],
        }
    )
    signature = sign.sign(REQUEST_DOMAIN, signed_part)
    return signed_part + signature + mac(secret, signed_part + signature)


def decode_request(data: bytes) -> JoinRequest:
    if len(data) > MAX_REQUEST:
        raise WireError(DropReason.TOO_LARGE, "join request")
    if wire.parse_header(data) is not Kind.JOIN_REQUEST:
        raise WireError(DropReason.UNEXPECTED, "not a join request")
    trailer = SIG_LEN + 32
    if len(data) < wire.HEADER_LEN + trailer + 1:
        raise WireError(DropReason.TOO_SHORT, "join request")
    signed_part, signature, tag = data[:-trailer], data[-trailer:-32], data[-32:]
    m = wire.as_map(
        wire.unpack(signed_part[wire.HEADER_LEN :], max_str=253, max_bin=512, max_array=8),
        "join request",
    )
    endpoints = wire.endpoints_field(m, "ep", 8)
    cookie = wire.bin_field(m, "ck")
    if len(cookie) not in (0, COOKIE_LEN):
        raise WireError(DropReason.MALFORMED, "cookie length")
    name = wire.field(m, "name", str)
    if not 0 < len(name) <= 63:
        raise WireError(DropReason.MALFORMED, "name length")
    return JoinRequest(
        request_id=wire.bin_field(m, "rid", REQUEST_ID_LEN),
        cookie=cookie,
        claims_raw=wire.bin_field(m, "tok"),
        reply_key=wire.bin_field(m, "eph", PUB_LEN),
        sign_key=wire.bin_field(m, "sk", PUB_LEN),
        wg_key=wire.bin_field(m, "wg", PUB_LEN),
        name=name,
        hostname=wire.opt_field(m, "host", str),
        endpoints=tuple(endpoints),
        signed_part=signed_part,
        signature=signature,
        tag=tag,
    )


# --------------------------------------------------------------------- cookie, error


def make_cookie(cookie_secret: bytes, addr: Addr, bucket: int) -> bytes:
    return mac(cookie_secret, wire.pack([bucket, addr[0], addr[1]]))[:COOKIE_LEN]


def cookie_valid(
    cookie_secret: bytes, addr: Addr, cookie: bytes, now: float, period: float
) -> bool:
    """A cookie from this or the previous period, for this source address."""
    if len(cookie) != COOKIE_LEN:
        return False
    bucket = int(now // period)
    return any(
        mac_ok(cookie_secret, wire.pack([b, addr[0], addr[1]]), cookie)
        for b in (bucket, bucket - 1)
    )


def encode_cookie(request_id: bytes, cookie: bytes) -> bytes:
    return wire.header(Kind.JOIN_COOKIE) + request_id + cookie


def decode_cookie(data: bytes) -> tuple[bytes, bytes]:
    if len(data) != wire.HEADER_LEN + REQUEST_ID_LEN + COOKIE_LEN:
        raise WireError(DropReason.MALFORMED, "cookie packet length")
    body = data[wire.HEADER_LEN :]
    return body[:REQUEST_ID_LEN], body[REQUEST_ID_LEN:]


def encode_error(request_id: bytes, code: JoinErrorCode, secret: bytes | None) -> bytes:
    """An error reply, MACed when the seed could derive the token secret."""
    head = wire.header(Kind.JOIN_ERROR) + request_id + bytes((code,))
    return head + (mac(secret, head)[:ERROR_MAC_LEN] if secret is not None else b"")


def decode_error(data: bytes, secret: bytes) -> tuple[bytes, JoinErrorCode, bool]:
    """Return (request id, code, authenticated)."""
    head_len = wire.HEADER_LEN + REQUEST_ID_LEN + 1
    if len(data) not in (head_len, head_len + ERROR_MAC_LEN):
        raise WireError(DropReason.MALFORMED, "error packet length")
    try:
        code = JoinErrorCode(data[head_len - 1])
    except ValueError:
        raise WireError(DropReason.MALFORMED, "unknown error code") from None
    authed = len(data) > head_len and mac_ok(secret, data[:head_len], data[head_len:])
    return data[wire.HEADER_LEN : head_len - 1], code, authed


# ------------------------------------------------------------------------------ reply


def _reply_key(shared: bytes, secret: bytes, request_id: bytes) -> bytes:
    return hkdf(shared, salt=secret, info=b"meshd join reply v1" + request_id)


def exchange(key: WireGuardKey, peer_public: bytes) -> bytes:
    """X25519 with the peer's ephemeral key; a low-order key (all-zero secret) is refused."""
    try:
        return key.exchange(peer_public)
    except ValueError:
        raise WireError(DropReason.MALFORMED, "ephemeral key is a low-order point") from None


def seal_reply(
    payload: bytes, request_id: bytes, secret: bytes, joiner_eph: bytes, seed_eph: WireGuardKey
) -> list[bytes]:
    """Encrypt the grant to the joiner and split it into JOIN_REPLY datagrams."""
    key = _reply_key(exchange(seed_eph, joiner_eph), secret, request_id)
    ct = AESGCM(key).encrypt(bytes(12), payload, request_id)
    chunks = [ct[i : i + CHUNK_DATA] for i in range(0, len(ct), CHUNK_DATA)]
    if len(chunks) > MAX_CHUNKS:
        raise ValueError("join reply too large")
    prefix = wire.header(Kind.JOIN_REPLY) + request_id + seed_eph.public
    return [prefix + _CHUNK_HDR.pack(i, len(chunks)) + c for i, c in enumerate(chunks)]


@dataclass(frozen=True)
class ReplyChunk:
    request_id: bytes
    seed_eph: bytes
    index: int
    total: int
    data: bytes


def decode_reply_chunk(data: bytes) -> ReplyChunk:
    fixed = wire.HEADER_LEN + REQUEST_ID_LEN + PUB_LEN + _CHUNK_HDR.size
    if len(data) <= fixed or len(data) > fixed + CHUNK_DATA:
        raise WireError(DropReason.MALFORMED, "reply chunk length")
    p = wire.HEADER_LEN
    index, total = _CHUNK_HDR.unpack_from(data, p + REQUEST_ID_LEN + PUB_LEN)
    if not 0 <= index < total <= MAX_CHUNKS:
        raise WireError(DropReason.MALFORMED, "reply chunk index")
    return ReplyChunk(
        request_id=data[p : p + REQUEST_ID_LEN],
        seed_eph=data[p + REQUEST_ID_LEN : p + REQUEST_ID_LEN + PUB_LEN],
        index=index,
        total=total,
        data=data[fixed:],
    )


@dataclass(frozen=True)
class JoinGrant:
    """What a successful join hands the new member."""

    admission: SignedBlob
    ca_public: bytes
    keyring: tuple[bytes, ...]
    token_key: bytes
    plan: AddressPlan
    zone: str
    leader: bytes
    seed: bytes
    records: tuple[SignedBlob, ...]
    leases: tuple[SignedBlob, ...]

    def encode(self) -> bytes:
        return wire.pack(
            {
                "cert": self.admission.to_wire(),
                "ca": self.ca_public,
                "keys": list(self.keyring),
                "tk": self.token_key,
                "plan": self.plan.to_dict(),
                "zone": self.zone,
                "leader": self.leader,
                "seed": self.seed,
                "recs": [r.to_wire() for r in self.records],
                "leases": [x.to_wire() for x in self.leases],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> JoinGrant:
        m = wire.as_map(wire.unpack(data, max_array=20_000, max_map=32), "join grant")
        try:
            plan = AddressPlan.from_dict(wire.as_map(m.get("plan"), "plan"))
        except IpamError as exc:
            raise WireError(DropReason.MALFORMED, f"plan: {exc}") from None
        keys = wire.as_list(wire.field(m, "keys", list), "keyring", 16)
        if not keys or not all(isinstance(k, bytes) and len(k) == wire.KEY_LEN for k in keys):
            raise WireError(DropReason.MALFORMED, "keyring")
        return cls(
            admission=SignedBlob.from_wire(m.get("cert"), "admission"),
            ca_public=wire.bin_field(m, "ca", PUB_LEN),
            keyring=tuple(keys),
            token_key=wire.bin_field(m, "tk", 32),
            plan=plan,
            zone=wire.field(m, "zone", str),
            leader=wire.bin_field(m, "leader", NODE_ID_LEN),
            seed=wire.bin_field(m, "seed", NODE_ID_LEN),
            records=tuple(
                SignedBlob.from_wire(r, "record")
                for r in wire.as_list(wire.field(m, "recs", list), "records", 20_000)
            ),
            leases=tuple(
                SignedBlob.from_wire(x, "lease")
                for x in wire.as_list(wire.field(m, "leases", list), "leases", 20_000)
            ),
        )


# ----------------------------------------------------------------------------- client


class JoinState(enum.Enum):
    REQUESTING = "requesting"
    JOINED = "joined"
    FAILED = "failed"


@dataclass(frozen=True)
class JoinSucceeded:
    grant: JoinGrant
    seed_addr: Addr


@dataclass(frozen=True)
class JoinFailed:
    """Terminal failure; ``reason`` is one sentence for the operator."""

    reason: str


@dataclass
class _Assembly:
    seed_eph: bytes
    total: int
    parts: dict[int, bytes] = field(default_factory=dict)


class JoinClient:
    """The joiner's side: retries across seeds with backoff until a grant or the deadline."""

    def __init__(
        self,
        *,
        token: str,
        seeds: Sequence[Addr],
        sign: SigningKey,
        wg_key: bytes,
        reply_key: WireGuardKey,
        request_id: bytes,
        name: str,
        hostname: str | None,
        endpoints: Sequence[str],
        now: float,
        timeout: float = 30.0,
        initial_rto: float = 0.25,
        max_rto: float = 4.0,
    ) -> None:
        if not seeds:
            raise ValueError("at least one seed address is needed")
        self.claims: TokenClaims
        self.claims, self._secret = parse_token(token)
        self.seeds: tuple[Addr, ...] = tuple(seeds)
        self._sign = sign
        self._wg_key = wg_key
        self._reply_key = reply_key
        self.request_id = request_id
        self._name = name
        self._hostname = hostname
        self._endpoints = list(endpoints)
        self._deadline = now + timeout
        self._rto = initial_rto
        self._max_rto = max_rto
        self._cookies: dict[Addr, bytes] = {}
        self._next_seed = 0
        self._timer: float | None = now
        self._out: list[tuple[bytes, Addr]] = []
        self._events: list[JoinSucceeded | JoinFailed] = []
        self._assembly: dict[Addr, _Assembly] = {}
        self._heard_from: set[Addr] = set()
        self._soft_errors: list[str] = []
        self.state = JoinState.REQUESTING
        self.drops: dict[DropReason, int] = {}

    # -- outputs ----------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._timer if self.state is JoinState.REQUESTING else None

    def next_event(self) -> JoinSucceeded | JoinFailed | None:
        return self._events.pop(0) if self._events else None

    # -- inputs -----------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        if self.state is not JoinState.REQUESTING or self._timer is None or now < self._timer:
            return
        if now >= self._deadline:
            self._fail(self._timeout_reason())
            return
        seed = self.seeds[self._next_seed % len(self.seeds)]
        self._next_seed += 1
        self._send(seed)
        if self._next_seed % len(self.seeds) == 0:
            self._rto = min(self._rto * 2, self._max_rto)
        self._timer = min(now + self._rto, self._deadline)

    def receive(self, data: bytes, addr: Addr, now: float) -> None:
        if self.state is not JoinState.REQUESTING:
            return
        try:
            kind = wire.parse_header(data)
            if kind is Kind.JOIN_COOKIE:
                self._on_cookie(data, addr)
            elif kind is Kind.JOIN_REPLY:
                self._on_chunk(data, addr, now)
            elif kind is Kind.JOIN_ERROR:
                self._on_error(data, addr)
            else:
                raise WireError(DropReason.UNEXPECTED, f"{kind.name} during join")
        except WireError as exc:
            self.drops[exc.reason] = self.drops.get(exc.reason, 0) + 1

    # -- internals --------------------------------------------------------------------

    def _send(self, seed: Addr) -> None:
        packet = encode_request(
            request_id=self.request_id,
            cookie=self._cookies.get(seed, b""),
            claims_raw=self.claims.raw,
            secret=self._secret,
            reply_key=self._reply_key.public,
            sign=self._sign,
            wg_key=self._wg_key,
            name=self._name,
            hostname=self._hostname,
            endpoints=self._endpoints,
        )
        self._out.append((packet, seed))

    def _on_cookie(self, data: bytes, addr: Addr) -> None:
        rid, cookie = decode_cookie(data)
        if rid != self.request_id or addr not in self.seeds:
            raise WireError(DropReason.UNEXPECTED, "cookie for another request")
        self._heard_from.add(addr)
        if self._cookies.get(addr) != cookie:
            self._cookies[addr] = cookie
            self._send(addr)

    def _on_error(self, data: bytes, addr: Addr) -> None:
        rid, code, authed = decode_error(data, self._secret)
        if rid != self.request_id or addr not in self.seeds:
            raise WireError(DropReason.UNEXPECTED, "error for another request")
        self._heard_from.add(addr)
        text = f"{ERROR_TEXT[code]} (seed {addr[0]}:{addr[1]})"
        if code >= JoinErrorCode.TRY_AGAIN:
            self._soft_errors.append(text)
        elif authed or code is JoinErrorCode.BAD_TOKEN:
            # An unauthenticated error is only believed when the seed could not have
            # derived the secret anyway (a bad token); others must carry the MAC.
            self._fail(text)
        else:
            raise WireError(DropReason.AUTH_FAILED, "unauthenticated join error")

    def _on_chunk(self, data: bytes, addr: Addr, now: float) -> None:
        chunk = decode_reply_chunk(data)
        if chunk.request_id != self.request_id or addr not in self.seeds:
            raise WireError(DropReason.UNEXPECTED, "reply for another request")
        self._heard_from.add(addr)
        asm = self._assembly.get(addr)
        if asm is None or asm.seed_eph != chunk.seed_eph or asm.total != chunk.total:
            asm = self._assembly[addr] = _Assembly(chunk.seed_eph, chunk.total)
        asm.parts[chunk.index] = chunk.data
        if len(asm.parts) < asm.total:
            return
        del self._assembly[addr]
        ct = b"".join(asm.parts[i] for i in range(asm.total))
        key = _reply_key(exchange(self._reply_key, asm.seed_eph), self._secret, self.request_id)
        try:
            payload = AESGCM(key).decrypt(bytes(12), ct, self.request_id)
        except InvalidTag:
            raise WireError(DropReason.AUTH_FAILED, "join reply does not decrypt") from None
        grant = JoinGrant.decode(payload)
        if cluster_id(grant.ca_public) != self.claims.cluster:
            raise WireError(DropReason.BAD_SIGNATURE, "grant is for another cluster")
        adm = verify_admission(grant.admission, grant.ca_public, grant.plan, now)
        if adm.subject != self._sign.node_id or adm.wg_key != self._wg_key:
            raise WireError(DropReason.BAD_SIGNATURE, "grant admits someone else")
        self.state = JoinState.JOINED
        self._events.append(JoinSucceeded(grant, addr))

    def _fail(self, reason: str) -> None:
        self.state = JoinState.FAILED
        self._events.append(JoinFailed(reason))

    def _timeout_reason(self) -> str:
        seeds = ", ".join(f"{h}:{p}" for h, p in self.seeds)
        if self._soft_errors:
            return f"join timed out: {self._soft_errors[-1]}"
        if self._heard_from:
            return f"join timed out: seeds answered but never completed the join ({seeds})"
        return f"no seed answered ({seeds}); is meshd running there and the port reachable?"
