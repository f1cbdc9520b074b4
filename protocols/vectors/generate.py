"""Golden vectors for protocols/wire.md: fixed keys and inputs in, exact bytes out.

Ed25519 signatures are deterministic (RFC 8032), so every vector is reproducible.
``python -m protocols.vectors.generate`` rewrites ``vectors.json``; the test
``tests/unit/test_vectors.py`` rebuilds each vector and compares byte for byte,
and also decodes the stored bytes with the current decoders.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from meshd.core import join, wire
from meshd.core.admission import issue_admission, mint_token, sign_lease, token_secret
from meshd.core.crypto import SigningKey, WireGuardKey
from meshd.core.ipam import AddressPlan
from meshd.core.membership import PROFILES, Membership
from meshd.core.records import sign_record

PATH = Path(__file__).with_name("vectors.json")
NOW = 1_790_000_000.0


def seed(n: int) -> bytes:
    """Deterministic 32-byte test secrets: bytes n, n+1, ... (mod 256)."""
    return bytes((n + i) % 256 for i in range(32))


def build() -> dict[str, Any]:
    plan = AddressPlan.parse("10.200.0.0/16", "fd00:200::/48")
    ca = SigningKey(seed(1))
    leader = SigningKey(seed(2))
    member = SigningKey(seed(3))
    wg = WireGuardKey(seed(4))
    keyring = wire.Keyring([seed(5), seed(6)])
    token_key = seed(7)

    lease = sign_lease(ca, 0, leader.public, NOW)
    released = sign_lease(ca, 7, None, NOW + 1)
    adm = issue_admission(leader, lease, member.public, wg.public, 2, NOW)
    record = sign_record(
        member,
        seq=3,
        name="node2",
        hostname="db.example",
        wg_key=wg.public,
        endpoints=["192.0.2.10:7946"],
        now=NOW,
        version="0.1.0",
        admission=adm.blob,
        wg_port=51999,
    )
    body = wire.pack({"t": "push", "recs": [record.to_wire()], "leases": [], "ack": False})
    sealed = keyring.seal(body, lambda n: bytes(range(n)))
    swim = {
        "t": "swim",
        "m": {
            "k": "ping",
            "seq": 7,
            "to": leader.node_id,
            "from": member.node_id,
            "g": [
                {"k": "v", "id": member.node_id, "s": 3},
                {"k": "alive", "id": member.node_id, "inc": 2, "a": "192.0.2.10:7946"},
            ],
        },
    }
    sealed_swim = keyring.seal(wire.pack(swim), lambda n: bytes(range(n)))
    pp_digest, pp_entries = _push_pull(member.node_id, leader.node_id)
    token, claims = mint_token(token_key, leader.node_id, ca.public, seed(8)[:8], NOW, 3600, 1)
    secret = token_secret(token_key, claims.raw)
    request = join.encode_request(
        request_id=seed(9)[:16],
        cookie=seed(10)[:16],
        claims_raw=claims.raw,
        secret=secret,
        reply_key=WireGuardKey(seed(11)).public,
        sign=member,
        wg_key=wg.public,
        name="node2",
        hostname=None,
        endpoints=["192.0.2.10:7946"],
    )
    reply = join.seal_reply(
        b"grant bytes", seed(9)[:16], secret, WireGuardKey(seed(11)).public, WireGuardKey(seed(12))
    )
    return {
        "inputs": {
            "now": NOW,
            "plan": plan.to_dict(),
            "seeds": "SigningKey/WireGuardKey seeds are bytes (n+i)%256: ca=1 leader=2 member=3 "
            "wg=4 keyring=5,6 token_key=7 token_id=8[:8] rid=9[:16] cookie=10[:16] "
            "joiner_eph=11 seed_eph=12; sealed nonce = 00..0b",
        },
        "ca_public": ca.public.hex(),
        "member_node_id": member.node_id.hex(),
        "keyring_key_ids": [k.hex() for k in keyring.key_ids()],
        "lease": lease.blob.encode().hex(),
        "lease_released": released.blob.encode().hex(),
        "admission": adm.blob.encode().hex(),
        "record": record.encode().hex(),
        "sealed_push": sealed.hex(),
        "sealed_swim_ping": sealed_swim.hex(),
        "swim_pp_digest": pp_digest.hex(),
        "swim_pp_entries": pp_entries.hex(),
        "token": token,
        "token_secret": secret.hex(),
        "join_request": request.hex(),
        "join_cookie": join.encode_cookie(seed(9)[:16], seed(10)[:16]).hex(),
        "join_error_used_up": join.encode_error(
            seed(9)[:16], join.JoinErrorCode.USED_UP, secret
        ).hex(),
        "join_reply": [p.hex() for p in reply],
    }


def _push_pull(a_id: bytes, b_id: bytes) -> tuple[bytes, bytes]:
    """A push-pull digest from node a (knows b) and b's answer (b knows a and one more)."""
    a_addr, b_addr = ("192.0.2.10", 7946), ("192.0.2.1", 7946)
    a = Membership(a_id, a_addr, PROFILES["lan"], random.Random(1), NOW, 2)
    b = Membership(b_id, b_addr, PROFILES["lan"], random.Random(2), NOW, 1)
    a.add_member(b_id, b_addr, 1, NOW)
    b.add_member(a_id, a_addr, 2, NOW)
    b.add_member(bytes(16), ("192.0.2.99", 7946), 5, NOW)
    a.self_version, b.self_version = 3, 4
    a.set_version(b_id, 4)
    b.set_version(a_id, 3)
    a.push_pull(NOW, b_addr)
    [(digest, _)] = a.messages_to_send()
    b.messages_to_send()
    b.receive(digest, a_addr, NOW)
    [(entries, _)] = b.messages_to_send()
    return wire.pack(digest), wire.pack(entries)


def main() -> None:
    PATH.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
