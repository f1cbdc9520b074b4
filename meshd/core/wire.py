"""Wire format: packet envelope, bounded msgpack decoding, and the keyring AEAD.

Every datagram starts with a two-byte header ``version | kind``. Gossip traffic
(kind SEALED) is encrypted with AES-256-GCM under the cluster keyring; the join
handshake (kinds 0x10..0x13) is cleartext framing around token-authenticated
payloads (see ``meshd/core/join.py``). The byte-level specification is
``protocols/wire.md``; golden vectors in ``protocols/vectors/`` pin it down.

Decoders here raise only :class:`WireError`, whose ``reason`` is a
:class:`DropReason` the adapter counts. Untrusted bytes are bounded before they
are parsed: total size first, then msgpack's per-container limits with ext types
disabled (TEST-HOSTS.md: msgpack is not canonical, so signatures are checked over
the exact received bytes, never over a re-encoding).
"""

from __future__ import annotations

import enum
import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION: Final = 1
HEADER_LEN: Final = 2
KEY_ID_LEN: Final = 4
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
KEY_LEN: Final = 32
SEALED_OVERHEAD: Final = HEADER_LEN + KEY_ID_LEN + NONCE_LEN + TAG_LEN
#: Largest datagram we ever send or accept. Gossip packets are sized far below it
#: (protocols/wire.md); the limit only bounds what a hostile sender can make us parse.
MAX_PACKET: Final = 65_000
#: Default limits for a msgpack body. Generous for records, tiny next to memory.
MAX_STR: Final = 4_096
MAX_BIN: Final = 60_000
MAX_ARRAY: Final = 4_096
MAX_MAP: Final = 64
MAX_DEPTH: Final = 8

RandomBytes = Callable[[int], bytes]
Addr = tuple[str, int]
#: Longest ``host:port`` text accepted from the network.
MAX_ENDPOINT: Final = 64


class Kind(enum.IntEnum):
    """Second header byte: what the rest of the datagram is."""

    SEALED = 0x01
    JOIN_REQUEST = 0x10
    JOIN_COOKIE = 0x11
    JOIN_REPLY = 0x12
    JOIN_ERROR = 0x13


class DropReason(enum.Enum):
    """Why an inbound datagram was dropped. Each value is a metrics label."""

    TOO_SHORT = "too_short"
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    UNKNOWN_KIND = "unknown_kind"
    UNKNOWN_KEY = "unknown_key"
    AUTH_FAILED = "auth_failed"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale"
    UNEXPECTED = "unexpected"
    BAD_TOKEN = "bad_token"
    BAD_COOKIE = "bad_cookie"
    RATE_LIMITED = "rate_limited"


class WireError(Exception):
    """Remote protocol error: the peer sent bytes we refuse. Never our own bug."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


def header(kind: Kind) -> bytes:
    """The two-byte header for a packet of ``kind``."""
    return bytes((VERSION, kind))


def parse_header(data: bytes) -> Kind:
    """Validate size and header; return the packet kind."""
    if len(data) > MAX_PACKET:
        raise WireError(DropReason.TOO_LARGE, f"{len(data)} bytes")
    if len(data) < HEADER_LEN:
        raise WireError(DropReason.TOO_SHORT, f"{len(data)} bytes")
    if data[0] != VERSION:
        raise WireError(DropReason.BAD_VERSION, f"version {data[0]}")
    try:
        return Kind(data[1])
    except ValueError:
        raise WireError(DropReason.UNKNOWN_KIND, f"kind {data[1]:#04x}") from None


# --------------------------------------------------------------------------- msgpack


_packers = threading.local()


def pack(obj: Any) -> bytes:
    """Encode with the options every meshd encoder uses (bin type, no ext).

    One packer per thread, kept: ``msgpack.packb`` builds a packer (and its 1 MB
    buffer) per call, which made a small message cost 1.4 us instead of 0.7."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)  # type: ignore[no-any-return]


def unpack(
    data: bytes,
    *,
    max_str: int = MAX_STR,
    max_bin: int = MAX_BIN,
    max_array: int = MAX_ARRAY,
    max_map: int = MAX_MAP,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Decode one msgpack object from untrusted bytes, bounded in every dimension.

    Trailing bytes, ext types, non-string map keys and nesting deeper than
    ``max_depth`` are rejected: the sender controls all of them.
    """
    if len(data) > MAX_PACKET:
        raise WireError(DropReason.TOO_LARGE, f"body of {len(data)} bytes")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=max_str,
            max_bin_len=max_bin,
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise WireError(DropReason.MALFORMED, "trailing data after body") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise WireError(DropReason.MALFORMED, f"msgpack: {exc}") from None
    _check_depth(obj, max_depth)
    return obj


def _check_depth(obj: Any, max_depth: int) -> None:
    """Nesting at most ``max_depth`` deep and string map keys only (msgpack's
    ``strict_map_key`` still lets ``bin`` keys through)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            if depth > max_depth:
                raise WireError(DropReason.MALFORMED, f"nesting deeper than {max_depth}")
            if isinstance(item, dict) and not all(isinstance(k, str) for k in item):
                raise WireError(DropReason.MALFORMED, "map key is not a string")
            children: Iterable[Any] = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


# ------------------------------------------------------------------ schema helpers
# Small typed accessors so that every decoder turns a wrong type into WireError.


def field(m: Mapping[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    """``m[name]`` checked to be of ``typ`` (bool is never accepted as int)."""
    if name not in m:
        raise WireError(DropReason.MALFORMED, f"missing field {name!r}")
    value = m[name]
    if isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise WireError(DropReason.MALFORMED, f"field {name!r} has wrong type")
    if not isinstance(value, typ):
        raise WireError(DropReason.MALFORMED, f"field {name!r} has wrong type")
    return value


def opt_field(m: Mapping[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    """Like :func:`field` but ``None`` or absent is allowed."""
    if m.get(name) is None:
        return None
    return field(m, name, typ)


def bin_field(m: Mapping[str, Any], name: str, length: int | None = None) -> bytes:
    value: bytes = field(m, name, bytes)
    if length is not None and len(value) != length:
        raise WireError(DropReason.MALFORMED, f"field {name!r} must be {length} bytes")
    return value


def int_field(m: Mapping[str, Any], name: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value: int = field(m, name, int)
    if not lo <= value <= hi:
        raise WireError(DropReason.MALFORMED, f"field {name!r} out of range")
    return value


def num_field(m: Mapping[str, Any], name: str) -> float:
    value = field(m, name, (int, float))
    if value != value or value in (float("inf"), float("-inf")) or value < 0:
        raise WireError(DropReason.MALFORMED, f"field {name!r} is not a finite time")
    return float(value)


def as_map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise WireError(DropReason.MALFORMED, f"{what} is not a map")
    return obj


def as_list(obj: Any, what: str, max_len: int = MAX_ARRAY) -> list[Any]:
    if not isinstance(obj, list):
        raise WireError(DropReason.MALFORMED, f"{what} is not an array")
    if len(obj) > max_len:
        raise WireError(DropReason.MALFORMED, f"{what} has more than {max_len} entries")
    return obj


def split_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or, with a default port, a bare host; ValueError if not."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r} is missing the closing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} has junk after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (expected HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r} has an invalid port")
    return host, int(port_text)


def format_hostport(addr: Addr) -> str:
    """``host:port``, bracketing IPv6 hosts so :func:`split_hostport` reads it back."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: Any, what: str) -> Addr:
    """An untrusted ``host:port`` (at most 64 characters, non-empty host) or WireError."""
    if not isinstance(text, str) or len(text) > MAX_ENDPOINT:
        raise WireError(DropReason.MALFORMED, f"{what} must be a short host:port string")
    try:
        host, port = split_hostport(text)
    except ValueError as exc:
        raise WireError(DropReason.MALFORMED, f"{what}: {exc}") from None
    if not host:
        raise WireError(DropReason.MALFORMED, f"{what}: empty host")
    return host, port


def addr_field(m: Mapping[str, Any], name: str) -> Addr:
    return parse_endpoint(field(m, name, str), name)


def endpoints_field(m: Mapping[str, Any], name: str, max_len: int) -> list[str]:
    """A list of at most ``max_len`` ``host:port`` strings, each one parseable."""
    items = as_list(field(m, name, list), name, max_len)
    for item in items:
        parse_endpoint(item, name)
    return items


# --------------------------------------------------------------------------- keyring


def key_id(key: bytes) -> bytes:
    """Public 4-byte identifier of a keyring key, derived so no one has to assign ids."""
    return hashlib.sha256(b"meshd keyring key id\x00" + key).digest()[:KEY_ID_LEN]


class Keyring:
    """The cluster's gossip keys: one primary that seals, all of them open.

    Rotation without restart (memberlist's keyring model): install the new key
    everywhere, make it primary everywhere, then remove the old one. AES-GCM with
    random 96-bit nonces is safe for 2**32 packets per key (NIST SP 800-38D 8.3);
    rotate well before that.
    """

    def __init__(self, keys: Sequence[bytes], primary: bytes | None = None) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._aeads: dict[bytes, AESGCM] = {}
        self._keys: dict[bytes, bytes] = {}
        for key in keys:
            self.install(key)
        self._primary = key_id(primary if primary is not None else keys[0])
        if self._primary not in self._keys:
            raise ValueError("the primary key is not in the keyring")

    def install(self, key: bytes) -> bytes:
        """Add a key that can open packets; returns its key id."""
        if len(key) != KEY_LEN:
            raise ValueError(f"keyring keys are {KEY_LEN} bytes, got {len(key)}")
        kid = key_id(key)
        self._keys[kid] = key
        self._aeads[kid] = AESGCM(key)
        return kid

    def use(self, kid: bytes) -> None:
        """Make an installed key the one that seals."""
        if kid not in self._keys:
            raise ValueError(f"key {kid.hex()} is not installed")
        self._primary = kid

    def remove(self, kid: bytes) -> None:
        if kid == self._primary:
            raise ValueError("cannot remove the primary key; make another key primary first")
        self._keys.pop(kid, None)
        self._aeads.pop(kid, None)

    @property
    def primary_id(self) -> bytes:
        return self._primary

    def keys(self) -> list[bytes]:
        """All keys, primary first (the order the state file stores)."""
        return [self._keys[self._primary]] + [
            k for kid, k in self._keys.items() if kid != self._primary
        ]

    def key_ids(self) -> list[bytes]:
        return [key_id(k) for k in self.keys()]

    def seal(self, body: bytes, random_bytes: RandomBytes) -> bytes:
        """Encrypt ``body`` into a SEALED datagram under the primary key."""
        nonce = random_bytes(NONCE_LEN)
        aad = header(Kind.SEALED) + self._primary
        return aad + nonce + self._aeads[self._primary].encrypt(nonce, body, aad)

    def open(self, data: bytes) -> bytes:
        """Authenticate and decrypt a SEALED datagram; return the plaintext body."""
        if parse_header(data) is not Kind.SEALED:
            raise WireError(DropReason.UNEXPECTED, "not a sealed packet")
        if len(data) < SEALED_OVERHEAD:
            raise WireError(DropReason.TOO_SHORT, "sealed packet shorter than its overhead")
        kid = data[HEADER_LEN : HEADER_LEN + KEY_ID_LEN]
        aead = self._aeads.get(kid)
        if aead is None:
            raise WireError(DropReason.UNKNOWN_KEY, f"key id {kid.hex()}")
        aad_end = HEADER_LEN + KEY_ID_LEN
        nonce = data[aad_end : aad_end + NONCE_LEN]
        try:
            return aead.decrypt(nonce, data[aad_end + NONCE_LEN :], data[:aad_end])
        except InvalidTag:
            raise WireError(DropReason.AUTH_FAILED, "AEAD tag mismatch") from None
