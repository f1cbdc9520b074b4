"""Signed peer records decoded and verified per second, on one core.

Every member re-checks every record it receives against the cluster CA
(CA -> lease -> admission -> record: three Ed25519 signatures and four msgpack
decodes), so this rate bounds how fast a member can take in a view of the
cluster. Measured three ways:

* **cold**: every record distinct, so every one pays the full chain, through
  ``verify_record`` directly and through a fresh ``RecordStore.verify`` (which adds
  the verify cache's bookkeeping but never hits it);
* **cached**: the same records offered again to one warmed ``RecordStore``, as
  gossip does when peers repeat what a member already knows;
* **raw**: the parts, for context: one msgpack decode of a record body, all the
  decoding one record needs, and one Ed25519 verify.

The input is always the encoded bytes as they arrive (``[body, signature]``), so
every figure includes ``SignedBlob.decode``. Records are built the way
``protocols/vectors/generate.py`` and ``tests/unit/corenet.py`` build them, with the
default address plan; the process is pinned to one CPU while timing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from benchmarks.common import gc_paused, one_cpu, summarise
from meshd import __version__
from meshd.core import wire
from meshd.core.admission import issue_admission, sign_lease
from meshd.core.crypto import SignedBlob, SigningKey, WireGuardKey, verify
from meshd.core.ipam import AddressPlan
from meshd.core.records import RECORD_DOMAIN, RecordStore, sign_record, verify_record

NAME: Final = "records"
#: Issue time of every object; fixed so runs are reproducible (no expiry is set).
NOW: Final = 1_790_000_000.0


@dataclass(frozen=True)
class Settings:
    """How much work one run does; ``quick`` trades precision for time."""

    records: int  # distinct records (the cold batch)
    reps: int  # repetitions per measurement
    cached_passes: int  # passes over the record set per cached repetition
    raw_passes: int  # passes over the record set per raw repetition
    budget_s: float  # wall-clock cap per measurement; stops further repetitions

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(records=400, reps=5, cached_passes=10, raw_passes=3, budget_s=20.0)
        return cls(records=2_000, reps=9, cached_passes=20, raw_passes=5, budget_s=60.0)


@dataclass(frozen=True)
class RecordSet:
    """Distinct signed records of one cluster, encoded as they travel, plus what verifies them."""

    ca_public: bytes
    plan: AddressPlan
    encoded: tuple[bytes, ...]
    blocks: int

    def blobs(self) -> list[SignedBlob]:
        return [SignedBlob.decode(data, "record") for data in self.encoded]


def build_records(count: int, seed: int = 1, budget_s: float = 300.0) -> RecordSet:
    """``count`` records of distinct members, admitted by one holder per /28 block.

    Mirrors a real cluster: the CA leases block b to holder H_b, H_b admits the
    members at the usable offsets of b, and each member signs its own record
    (one endpoint, no hostname) embedding its admission. Keys are drawn from a
    seeded generator, so every run verifies the same bytes.
    """
    rnd = random.Random(seed)
    plan = AddressPlan.parse()
    ca = SigningKey(rnd.randbytes(32))
    encoded: list[bytes] = []
    deadline = time.monotonic() + budget_s
    block = 0
    while len(encoded) < count and block < plan.num_blocks:
        if time.monotonic() > deadline:
            raise RuntimeError(f"building {count} records took longer than {budget_s} s")
        holder = SigningKey(rnd.randbytes(32))
        lease = sign_lease(ca, block, holder.public, NOW)
        offsets = [o for o in plan.offsets(block) if not plan.is_reserved(o)]
        for offset in offsets[: count - len(encoded)]:
            member = SigningKey(rnd.randbytes(32))
            wg = WireGuardKey(rnd.randbytes(32))
            adm = issue_admission(holder, lease, member.public, wg.public, offset, NOW)
            record = sign_record(
                member,
                seq=1,
                name=f"node-{len(encoded) + 1}",
                hostname=None,
                wg_key=wg.public,
                endpoints=[f"192.0.2.{offset % 250 + 1}:7946"],
                now=NOW,
                version=__version__,
                admission=adm.blob,
            )
            encoded.append(record.encode())
        block += 1
    return RecordSet(ca.public, plan, tuple(encoded), block)


def _timed(batch: Callable[[], int], reps: int, budget_s: float) -> list[tuple[int, float]]:
    """Run ``batch`` up to ``reps`` times (fewer if ``budget_s`` runs out): (ops, seconds) each."""
    runs: list[tuple[int, float]] = []
    start = time.perf_counter()
    for _ in range(reps):
        with gc_paused():
            t0 = time.perf_counter_ns()
            ops = batch()
            elapsed = (time.perf_counter_ns() - t0) / 1e9
        runs.append((ops, elapsed))
        if time.perf_counter() - start > budget_s:
            break
    return runs


def _measure(
    what: str, batch: Callable[[], int], settings: Settings, **extra: Any
) -> dict[str, Any]:
    """One measurement: per-repetition rates summarised as ops/s and microseconds per op."""
    runs = _timed(batch, settings.reps, settings.budget_s)
    rates = [ops / s for ops, s in runs]
    return {
        "what": what,
        "ops_per_rep": runs[0][0],
        "reps": len(runs),
        "ops_per_s": summarise(rates),
        "us_per_op": summarise([1e6 / r for r in rates]),
        **extra,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Build the records, time every measurement, and return the results as a dict."""
    settings = Settings.for_mode(quick)
    t_build = time.perf_counter()
    rs = build_records(settings.records)
    build_s = time.perf_counter() - t_build
    sizes = [len(d) for d in rs.encoded]
    blobs = rs.blobs()
    bodies = [b.body for b in blobs]
    keys = [wire.unpack(b)["sk"] for b in bodies]
    ca, plan = rs.ca_public, rs.plan

    def cold_verify_record() -> int:
        for data in rs.encoded:
            verify_record(SignedBlob.decode(data, "record"), ca, plan, NOW)
        return len(rs.encoded)

    cold_stores: list[RecordStore] = []

    def cold_store() -> int:
        store = RecordStore(ca, plan)  # fresh: no record has been seen
        for data in rs.encoded:
            store.verify(SignedBlob.decode(data, "record"), NOW)
        cold_stores.append(store)
        return len(rs.encoded)

    warm = RecordStore(ca, plan)
    for blob in blobs:
        warm.verify(blob, NOW)  # untimed: fills the cache

    def cached_store() -> int:
        for _ in range(settings.cached_passes):
            for data in rs.encoded:
                warm.verify(SignedBlob.decode(data, "record"), NOW)
        return settings.cached_passes * len(rs.encoded)

    def raw_unpack_bounded() -> int:
        for _ in range(settings.raw_passes):
            for body in bodies:
                wire.unpack(body)
        return settings.raw_passes * len(bodies)

    def raw_unpack_plain() -> int:
        for _ in range(settings.raw_passes):
            for body in bodies:
                msgpack.unpackb(body, raw=False)
        return settings.raw_passes * len(bodies)

    def raw_unpack_chain() -> int:
        for _ in range(settings.raw_passes):
            for data in rs.encoded:
                body, _ = wire.unpack(data)
                adm_body, _ = wire.unpack(body)["cert"]
                lease_body, _ = wire.unpack(adm_body)["lease"]
                wire.unpack(lease_body)
        return settings.raw_passes * len(rs.encoded)

    def raw_ed25519() -> int:
        for _ in range(settings.raw_passes):
            for key, blob in zip(keys, blobs, strict=True):
                verify(key, RECORD_DOMAIN, blob.body, blob.signature)
        return settings.raw_passes * len(blobs)

    loaded = [Ed25519PublicKey.from_public_bytes(k) for k in keys]
    messages = [RECORD_DOMAIN + b"\x00" + b.body for b in blobs]

    def raw_ed25519_loaded() -> int:
        for _ in range(settings.raw_passes):
            for pub, msg, blob in zip(loaded, messages, blobs, strict=True):
                pub.verify(blob.signature, msg)
        return settings.raw_passes * len(blobs)

    hits_before = warm.cache.hits
    with one_cpu() as cpu:
        results = {
            "cold_verify_record": _measure(
                "SignedBlob.decode + verify_record, every record distinct",
                cold_verify_record,
                settings,
            ),
            "cold_store_verify": _measure(
                "SignedBlob.decode + RecordStore.verify on a fresh store (all misses)",
                cold_store,
                settings,
            ),
            "cached_store_verify": _measure(
                "SignedBlob.decode + RecordStore.verify, records already in the cache",
                cached_store,
                settings,
            ),
            "raw_unpack_record_body": _measure(
                "wire.unpack (bounded msgpack) of one record body", raw_unpack_bounded, settings
            ),
            "raw_unpack_record_body_plain": _measure(
                "msgpack.unpackb of one record body (no limits)", raw_unpack_plain, settings
            ),
            "raw_unpack_record_chain": _measure(
                "the four wire.unpack calls one record needs (pair, record, admission, lease)",
                raw_unpack_chain,
                settings,
            ),
            "raw_ed25519_verify": _measure(
                "one Ed25519 verify via meshd.core.crypto.verify (loads the key from bytes)",
                raw_ed25519,
                settings,
            ),
            "raw_ed25519_verify_key_loaded": _measure(
                "one Ed25519 verify with the public key object already loaded",
                raw_ed25519_loaded,
                settings,
            ),
        }
    results["cold_store_verify"]["cache_misses"] = [s.cache.misses for s in cold_stores]
    results["cold_store_verify"]["cache_hits"] = [s.cache.hits for s in cold_stores]
    results["cached_store_verify"]["cache_hits"] = warm.cache.hits - hits_before
    return {
        "benchmark": NAME,
        "mode": "quick" if quick else "full",
        "pinned_cpu": cpu,
        "records": {
            "count": len(rs.encoded),
            "blocks": rs.blocks,
            "bytes_per_record": summarise(sizes),
            "plan": rs.plan.to_dict(),
            "build_s": round(build_s, 3),
        },
        "settings": settings.__dict__,
        "results": results,
    }


def format_summary(res: dict[str, Any]) -> str:
    """Human-readable table: median ops/s with the min..max range, and microseconds per op."""
    rec = res["records"]
    size = rec["bytes_per_record"]
    cpu = res["pinned_cpu"]
    lines = [
        f"records: {rec['count']} distinct records, {size['median']:.0f} bytes each "
        f"(min {size['min']}, max {size['max']}), one core"
        + (f" (pinned to CPU {cpu})" if cpu is not None else ""),
        f"  {'measurement':<32} {'median/s':>10} {'min/s':>10} {'max/s':>10} "
        f"{'us/op':>8} {'reps':>5}",
    ]
    for key, m in res["results"].items():
        ops = m["ops_per_s"]
        lines.append(
            f"  {key:<32} {ops['median']:>10,.0f} {ops['min']:>10,.0f} {ops['max']:>10,.0f} "
            f"{m['us_per_op']['median']:>8.2f} {m['reps']:>5}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_summary(run(quick=True)))
