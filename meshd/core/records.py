"""Signed peer records and the replicated views of records and leases.

Each member publishes one record about itself, signed with its node key and
carrying its admission certificate, so a record verifies with nothing but the
cluster CA key and the address plan (CA -> lease -> admission -> record). A
member's overlay addresses are not repeated in the record: they follow from the
admitted offset, so a record cannot claim an address it was not given.

Merge rule (the same on every node, so views converge): a strictly higher
``seq`` from the same node wins; an equal ``seq`` with other bytes is a conflict
and is refused; anything that fails verification never touches the view.
A cold record costs three Ed25519 checks (lease, admission, record: ~0.6 ms here,
docs/benchmarks.md), so results are cached by the exact received bytes, a record is
checked once, and the lease a block's records share is checked once for all of them.
"""

from __future__ import annotations

import enum
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final, TypeVar, cast

from meshd.core import wire
from meshd.core.admission import (
    Admission,
    Lease,
    LeaseVerifier,
    verify_admission,
    verify_lease,
)
from meshd.core.crypto import NODE_ID_LEN, PUB_LEN, SignedBlob, SigningKey
from meshd.core.ipam import AddressPlan
from meshd.core.wire import DropReason, WireError

RECORD_DOMAIN: Final = b"meshd record v1"
MAX_ENDPOINTS: Final = 16
MAX_NAME: Final = 63
MAX_HOSTNAME: Final = 253
#: WireGuard's customary port; what ``meshd`` listens on unless ``--wg-port`` says otherwise.
DEFAULT_WG_PORT: Final = 51820


@dataclass(frozen=True)
class PeerRecord:
    """A verified peer record."""

    node_id: bytes
    seq: int
    name: str
    hostname: str | None
    sign_key: bytes
    wg_key: bytes
    endpoints: tuple[str, ...]
    #: The member's WireGuard listen port (0: it has no WireGuard interface to dial).
    #: Its WireGuard endpoint is the host of ``endpoints[0]`` at this port.
    wg_port: int
    issued_at: float
    version: str
    admission: Admission
    blob: SignedBlob

    def addresses(self, plan: AddressPlan) -> tuple[IPv4Address, IPv6Address]:
        return plan.address(self.admission.offset)


_LABEL_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def is_dns_label(text: str) -> bool:
    """A lower-case LDH label of 1-63 characters (RFC 1035 section 2.3.1, RFC 1123)."""
    return bool(_LABEL_RE.match(text))


def normalize_hostname(text: str) -> str:
    """Lower-case a host name and drop a trailing dot; ValueError if it is not one."""
    name = text.lower().rstrip(".")
    if not name or len(name) > MAX_HOSTNAME or not all(map(is_dns_label, name.split("."))):
        raise ValueError(f"hostname {text!r} is not a valid DNS name")
    return name


def sign_record(
    key: SigningKey,
    *,
    seq: int,
    name: str,
    hostname: str | None,
    wg_key: bytes,
    endpoints: list[str],
    now: float,
    version: str,
    admission: SignedBlob,
    wg_port: int = DEFAULT_WG_PORT,
) -> SignedBlob:
    """Build and sign this node's record. ``seq`` must grow with every change."""
    if not 0 <= wg_port <= 65535:
        raise ValueError(f"WireGuard port {wg_port} is out of range (0-65535)")
    return SignedBlob.sign(
        key,
        RECORD_DOMAIN,
        {
            "id": key.node_id,
            "seq": seq,
            "name": name,
            "host": hostname,
            "sk": key.public,
            "wg": wg_key,
            "ep": endpoints[:MAX_ENDPOINTS],
            "wgp": wg_port,
            "ts": now,
            "ver": version,
            "cert": admission.to_wire(),
        },
    )


def verify_record(
    blob: SignedBlob,
    ca_public: bytes,
    plan: AddressPlan,
    now: float,
    lease_verifier: LeaseVerifier | None = None,
) -> PeerRecord:
    """Verify a record and its chain; raise WireError (never anything else) if it is not genuine."""
    m = blob.fields("record")
    sign_key = wire.bin_field(m, "sk", PUB_LEN)
    blob.check(sign_key, RECORD_DOMAIN, "record")
    admission = verify_admission(
        SignedBlob.from_wire(m.get("cert"), "record admission"),
        ca_public,
        plan,
        now,
        lease_verifier,
    )
    nid = wire.bin_field(m, "id", NODE_ID_LEN)
    wg_key = wire.bin_field(m, "wg", PUB_LEN)
    if nid != admission.subject or sign_key != admission.sign_key or wg_key != admission.wg_key:
        raise WireError(DropReason.BAD_SIGNATURE, "record does not match its admission")
    endpoints = wire.endpoints_field(m, "ep", MAX_ENDPOINTS)
    name = wire.field(m, "name", str)
    hostname = wire.opt_field(m, "host", str)
    if not 0 < len(name) <= MAX_NAME or (hostname is not None and len(hostname) > MAX_HOSTNAME):
        raise WireError(DropReason.MALFORMED, "record name or hostname has a bad length")
    return PeerRecord(
        node_id=nid,
        seq=wire.int_field(m, "seq"),
        name=name,
        hostname=hostname,
        sign_key=sign_key,
        wg_key=wg_key,
        endpoints=tuple(endpoints),
        wg_port=wire.int_field(m, "wgp", 0, 65535),
        issued_at=wire.num_field(m, "ts"),
        version=wire.field(m, "ver", str),
        admission=admission,
        blob=blob,
    )


class Merge(enum.Enum):
    """Outcome of offering a record or lease to a view."""

    NEW = "new"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    STALE = "stale"
    CONFLICT = "conflict"


_T = TypeVar("_T", "PeerRecord", Lease)


@dataclass(frozen=True)
class _Refusal:
    """A cached verification failure. The reason is cached, never the exception object:
    re-raising one exception grows its traceback (and pins frames) on every hit."""

    reason: DropReason
    detail: str


class _VerifyCache:
    """Bounded LRU of verification results keyed by the exact bytes (body + signature)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, PeerRecord | Lease | _Refusal] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> PeerRecord | Lease | _Refusal | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return hit

    def put(self, key: bytes, value: PeerRecord | Lease | _Refusal) -> None:
        self._entries[key] = value
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)


class RecordStore:
    """This node's replicated view: one record per member, one lease per block."""

    def __init__(self, ca_public: bytes, plan: AddressPlan, cache_size: int = 16_384) -> None:
        self.ca_public = ca_public
        self.plan = plan
        self._records: dict[bytes, PeerRecord] = {}
        self._leases: dict[int, Lease] = {}
        self.cache = _VerifyCache(cache_size)

    # -- verification (cached) --------------------------------------------------------

    def _cached(self, tag: bytes, blob: SignedBlob, check: Callable[[], _T]) -> _T:
        """Run ``check`` once per distinct (kind, body, signature); failures are cached too."""
        key = tag + blob.body + blob.signature
        hit = self.cache.get(key)
        if hit is None:
            try:
                hit = check()
            except WireError as exc:
                hit = _Refusal(exc.reason, exc.detail)
            self.cache.put(key, hit)
        if isinstance(hit, _Refusal):
            raise WireError(hit.reason, hit.detail)
        return cast(_T, hit)

    def verify(self, blob: SignedBlob, now: float) -> PeerRecord:
        rec = self._cached(
            b"R",
            blob,
            lambda: verify_record(blob, self.ca_public, self.plan, now, self.verify_lease),
        )
        exp = rec.admission.expires  # cached results must still honour expiry
        if exp is not None and exp <= now:
            raise WireError(DropReason.STALE, "admission certificate has expired")
        return rec

    def verify_lease(self, blob: SignedBlob) -> Lease:
        return self._cached(b"L", blob, lambda: verify_lease(blob, self.ca_public, self.plan))

    # -- merging ----------------------------------------------------------------------

    def offer(self, blob: SignedBlob, now: float) -> tuple[Merge, PeerRecord]:
        """Verify and merge a record; WireError if it is not genuine."""
        rec = self.verify(blob, now)
        return self.merge_verified(rec), rec

    def merge_verified(self, rec: PeerRecord) -> Merge:
        cur = self._records.get(rec.node_id)
        if cur is None:
            self._records[rec.node_id] = rec
            return Merge.NEW
        if rec.seq > cur.seq:
            self._records[rec.node_id] = rec
            return Merge.UPDATED
        if rec.seq < cur.seq:
            return Merge.STALE
        return Merge.UNCHANGED if rec.blob == cur.blob else Merge.CONFLICT

    def offer_lease(self, blob: SignedBlob) -> tuple[Merge, Lease]:
        lease = self.verify_lease(blob)
        cur = self._leases.get(lease.block)
        if cur is None:
            self._leases[lease.block] = lease
            return Merge.NEW, lease
        if lease.blob == cur.blob:
            return Merge.UNCHANGED, lease
        if lease.newer_than(cur):
            self._leases[lease.block] = lease
            return Merge.UPDATED, lease
        return Merge.STALE, lease

    def remove(self, nid: bytes) -> PeerRecord | None:
        return self._records.pop(nid, None)

    # -- reading ----------------------------------------------------------------------

    def get(self, nid: bytes) -> PeerRecord | None:
        return self._records.get(nid)

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(sorted(self._records.values(), key=lambda r: (r.name, r.node_id)))

    def __len__(self) -> int:
        return len(self._records)

    def leases(self) -> list[Lease]:
        return [self._leases[b] for b in sorted(self._leases)]

    def lease(self, block: int) -> Lease | None:
        return self._leases.get(block)
