"""Envelope, bounded msgpack decoding and the keyring AEAD."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.core import wire
from meshd.core.wire import DropReason, Keyring, Kind, WireError


def fixed_nonce(n: int) -> bytes:
    return bytes(n)


K1, K2, K3 = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))


class TestHeader:
    def test_kinds(self) -> None:
        for kind in Kind:
            assert wire.parse_header(wire.header(kind) + b"x") is kind

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"", DropReason.TOO_SHORT),
            (b"\x01", DropReason.TOO_SHORT),
            (b"\x02\x01", DropReason.BAD_VERSION),
            (b"\x01\x7f", DropReason.UNKNOWN_KIND),
            (b"\x01\x01" + bytes(wire.MAX_PACKET), DropReason.TOO_LARGE),
        ],
    )
    def test_rejections(self, data: bytes, reason: DropReason) -> None:
        with pytest.raises(WireError) as err:
            wire.parse_header(data)
        assert err.value.reason is reason


class TestUnpack:
    def test_round_trip(self) -> None:
        obj = {"a": [1, 2, {"b": b"\x00"}], "s": "text", "f": 1.5, "n": None}
        assert wire.unpack(wire.pack(obj)) == obj

    @pytest.mark.parametrize(
        "data",
        [
            msgpack.packb("x" * 5000),
            msgpack.packb(b"x" * 70000, use_bin_type=True),
            msgpack.packb(list(range(5000))),
            msgpack.packb({str(i): i for i in range(100)}),
            msgpack.packb(msgpack.ExtType(1, b"abc")),
            msgpack.packb({1: 2}),
            msgpack.packb(1) + b"\x01",
            b"\x92\x01",
            b"\xc1",
        ],
        ids=["str", "bin", "array", "map", "ext", "intkey", "trailing", "truncated", "reserved"],
    )
    def test_limits(self, data: bytes) -> None:
        with pytest.raises(WireError) as err:
            wire.unpack(data)
        assert err.value.reason in (DropReason.MALFORMED, DropReason.TOO_LARGE)

    def test_depth(self) -> None:
        deep: object = 1
        for _ in range(9):
            deep = [deep]
        with pytest.raises(WireError, match="nesting"):
            wire.unpack(wire.pack(deep))
        shallow: object = 1
        for _ in range(8):
            shallow = [shallow]
        assert wire.unpack(wire.pack(shallow)) == shallow

    @given(st.binary(max_size=512))
    def test_random_bytes_only_wire_error(self, data: bytes) -> None:
        with contextlib.suppress(WireError):
            wire.unpack(data)

    def test_field_helpers(self) -> None:
        m = {"i": 3, "b": True, "x": b"ab", "t": float("nan"), "neg": -1}
        assert wire.int_field(m, "i") == 3
        with pytest.raises(WireError):
            wire.int_field(m, "b")  # a bool is not an int on our wire
        with pytest.raises(WireError):
            wire.bin_field(m, "x", 3)
        with pytest.raises(WireError):
            wire.num_field(m, "t")
        with pytest.raises(WireError):
            wire.num_field(m, "neg")
        with pytest.raises(WireError, match="missing"):
            wire.field(m, "nope", int)
        assert wire.opt_field(m, "nope", int) is None


class TestKeyring:
    def test_seal_open(self) -> None:
        ring = Keyring([K1])
        pkt = ring.seal(b"hello", fixed_nonce)
        assert len(pkt) == len(b"hello") + wire.SEALED_OVERHEAD
        assert ring.open(pkt) == b"hello"

    def test_rotation_without_restart(self) -> None:
        old = Keyring([K1])
        new = Keyring([K1])
        new.install(K2)
        new.use(wire.key_id(K2))
        # new seals with K2; old cannot open until it installs K2; new still opens K1
        pkt = new.seal(b"x", fixed_nonce)
        with pytest.raises(WireError) as err:
            old.open(pkt)
        assert err.value.reason is DropReason.UNKNOWN_KEY
        assert new.open(old.seal(b"y", fixed_nonce)) == b"y"
        old.install(K2)
        assert old.open(pkt) == b"x"
        new.remove(wire.key_id(K1))
        with pytest.raises(WireError):
            new.open(old.seal(b"z", fixed_nonce))
        assert new.keys() == [K2]

    def test_cannot_remove_primary(self) -> None:
        ring = Keyring([K1, K2])
        with pytest.raises(ValueError):
            ring.remove(wire.key_id(K1))

    def test_bad_key_length(self) -> None:
        with pytest.raises(ValueError):
            Keyring([b"short"])

    def test_tamper(self) -> None:
        ring = Keyring([K1])
        pkt = bytearray(ring.seal(b"payload", fixed_nonce))
        for i in range(len(pkt)):
            bad = bytearray(pkt)
            bad[i] ^= 0x01
            with pytest.raises(WireError):
                ring.open(bytes(bad))

    @given(
        installed=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=4),
        other=st.binary(min_size=32, max_size=32),
        body=st.binary(max_size=64),
        which=st.integers(min_value=0, max_value=3),
    )
    def test_any_installed_key_opens_others_rejected(
        self, installed: list[bytes], other: bytes, body: bytes, which: int
    ) -> None:
        ring = Keyring(installed)
        sender = Keyring([installed[which % len(installed)]])
        assert ring.open(sender.seal(body, fixed_nonce)) == body
        if other not in installed:
            with pytest.raises(WireError) as err:
                ring.open(Keyring([other]).seal(body, fixed_nonce))
            assert err.value.reason in (DropReason.UNKNOWN_KEY, DropReason.AUTH_FAILED)

    @given(st.binary(max_size=256))
    def test_open_random_bytes(self, data: bytes) -> None:
        ring = Keyring([K1, K3])
        with pytest.raises(WireError):
            ring.open(data)
