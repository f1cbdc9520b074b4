"""Identities and signatures: Ed25519 node and CA keys, X25519 WireGuard keys.

A node id is the first 16 bytes of SHA-256 over the node's Ed25519 public key,
so ids are self-certifying: a message that claims to come from node X is checked
by hashing the key it carries, with no lookup (as in libp2p peer ids). Keys are
built from caller-supplied seed bytes so the core never reaches for global
randomness; the adapters pass ``os.urandom``.

Every signed object on the wire is a :class:`SignedBlob`: the exact body bytes
plus a signature over a domain-separated message, verified over the bytes as
received (msgpack is not canonical).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshd.core import wire
from meshd.core.wire import DropReason, WireError

NODE_ID_LEN: Final = 16
PUB_LEN: Final = 32
SIG_LEN: Final = 64


def node_id(sign_pub: bytes) -> bytes:
    """The 16-byte node id bound to an Ed25519 public key."""
    return hashlib.sha256(b"meshd node id\x00" + sign_pub).digest()[:NODE_ID_LEN]


class SigningKey:
    """An Ed25519 private key (node identity or cluster CA)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.seed = seed
        self.public = self._key.public_key().public_bytes_raw()
        self.node_id = node_id(self.public)

    def sign(self, domain: bytes, body: bytes) -> bytes:
        return self._key.sign(domain + b"\x00" + body)


def verify(public: bytes, domain: bytes, body: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is ``public``'s Ed25519 signature of ``domain || 0 || body``."""
    if len(public) != PUB_LEN or len(signature) != SIG_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, domain + b"\x00" + body)
    except (InvalidSignature, ValueError):
        return False
    return True


class WireGuardKey:
    """An X25519 private key as WireGuard uses it (RFC 7748 clamping is done by the library)."""

    def __init__(self, private: bytes) -> None:
        if len(private) != 32:
            raise ValueError("an X25519 private key is 32 bytes")
        self._key = X25519PrivateKey.from_private_bytes(private)
        self.private = self._key.private_bytes_raw()
        self.public = self._key.public_key().public_bytes_raw()

    def exchange(self, peer_public: bytes) -> bytes:
        return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def hkdf(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def mac_ok(key: bytes, data: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(mac(key, data)[: len(tag)], tag) and len(tag) >= 16


@dataclass(frozen=True)
class SignedBlob:
    """``[body, signature]`` on the wire; ``body`` is kept byte for byte as received."""

    body: bytes
    signature: bytes

    def encode(self) -> bytes:
        return wire.pack([self.body, self.signature])

    def to_wire(self) -> list[bytes]:
        return [self.body, self.signature]

    @classmethod
    def sign(cls, key: SigningKey, domain: bytes, fields: dict[str, Any]) -> SignedBlob:
        body = wire.pack(fields)
        return cls(body, key.sign(domain, body))

    @classmethod
    def from_wire(cls, obj: Any, what: str) -> SignedBlob:
        """From an already decoded ``[bin, bin]`` pair."""
        pair = wire.as_list(obj, what, 2)
        if len(pair) != 2 or not all(isinstance(x, bytes) for x in pair):
            raise WireError(DropReason.MALFORMED, f"{what} is not [body, signature]")
        if len(pair[1]) != SIG_LEN:
            raise WireError(DropReason.MALFORMED, f"{what} signature is not {SIG_LEN} bytes")
        return cls(pair[0], pair[1])

    @classmethod
    def decode(cls, data: bytes, what: str) -> SignedBlob:
        return cls.from_wire(wire.unpack(data), what)

    def fields(self, what: str) -> dict[str, Any]:
        """Decode the body (bounded) into a map."""
        return wire.as_map(wire.unpack(self.body), what)

    def check(self, public: bytes, domain: bytes, what: str) -> None:
        if not verify(public, domain, self.body, self.signature):
            raise WireError(DropReason.BAD_SIGNATURE, f"{what} signature does not verify")
