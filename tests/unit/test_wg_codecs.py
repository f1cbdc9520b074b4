"""UAPI text codec and the kernel dump merger, without a device."""

from __future__ import annotations

import contextlib
from base64 import b64encode
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.core.wgplan import AddPeer, PeerSpec, RemovePeer, UpdatePeer
from meshd.wg.base import InterfaceConfig, WireGuardError
from meshd.wg.kernel import merge_dump, peer_request
from meshd.wg.uapi import UapiError, clamp, encode_ops, encode_set, parse_errno, parse_get

K1 = bytes.fromhex("bdca8becd82fd6d5cc056b9f64dd49e7bc48017ecf795417ecf401ad122cb560")
K2 = bytes(range(32))

# Captured from wireguard-go 0.0.2023 (Debian 12) after `wg set`.
GET = f"""private_key=b0a44fc0eef2d44d7f69b7f9c19be67cddb5f6ffaf720ddcdf883bc63bd4e55b
listen_port=51999
public_key={K1.hex()}
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=192.0.2.1:51820
last_handshake_time_sec=1790000000
last_handshake_time_nsec=500000000
tx_bytes=148
rx_bytes=92
persistent_keepalive_interval=25
allowed_ip=10.1.0.2/32
allowed_ip=fd00::2/128
public_key={K2.hex()}
endpoint=[fd00::9]:51820
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
errno=0

"""


def test_parse_get() -> None:
    dev = parse_get(GET)
    assert dev.listen_port == 51999
    assert dev.private_key is not None and len(dev.private_key) == 32
    p1, p2 = dev.peers[K1], dev.peers[K2]
    assert p1.endpoint == "192.0.2.1:51820"
    assert p1.allowed_ips == {"10.1.0.2/32", "fd00::2/128"}
    assert p1.last_handshake == 1_790_000_000.5
    assert (p1.rx_bytes, p1.tx_bytes, p1.keepalive) == (92, 148, 25)
    assert p2.endpoint == "[fd00::9]:51820"
    assert p2.last_handshake is None and p2.allowed_ips == frozenset()


def test_parse_get_of_a_fresh_device() -> None:
    dev = parse_get("listen_port=0\nerrno=0\n\n")
    assert dev.private_key is None and dev.peers == {}


def test_errno_is_reported() -> None:
    assert parse_errno("errno=-22\n\n") == -22
    with pytest.raises(UapiError, match="errno -22"):
        parse_get("errno=-22\n\n")
    with pytest.raises(WireGuardError):
        parse_errno("garbage\n\n")


def test_encode_ops() -> None:
    spec = PeerSpec(K1, "192.0.2.1:51820", frozenset({"10.0.0.2/32", "fd00::2/128"}), 25)
    lines = encode_ops(
        [
            RemovePeer(K2),
            UpdatePeer(K1, endpoint="[fd00::1]:5"),
            UpdatePeer(K1, allowed_ips=frozenset({"10.0.0.3/32"})),
            AddPeer(spec),
        ]
    )
    assert lines == [
        f"public_key={K2.hex()}",
        "remove=true",
        f"public_key={K1.hex()}",
        "update_only=true",
        "endpoint=[fd00::1]:5",
        f"public_key={K1.hex()}",
        "update_only=true",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.3/32",
        f"public_key={K1.hex()}",
        "endpoint=192.0.2.1:51820",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.2/32",
        "allowed_ip=fd00::2/128",
    ]
    assert encode_set(["a=1"]) == b"set=1\na=1\n\n"
    with pytest.raises(ValueError):
        encode_set(["a=1\nremove=true"])


_UAPI_KEYS = [
    "private_key", "listen_port", "fwmark", "public_key", "endpoint", "allowed_ip",
    "last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes", "tx_bytes",
    "persistent_keepalive_interval", "protocol_version", "errno",
]  # fmt: skip
_values = st.one_of(
    st.text(max_size=70),
    st.sampled_from([K1.hex(), "0", "-1", "[fd00::1]:1", "10.0.0.1/32", "1.2.3.4:5", ""]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_UAPI_KEYS), _values), max_size=20))
def test_parse_get_never_raises_anything_but_wireguard_error(
    lines: list[tuple[str, str]],
) -> None:
    text = "".join(f"{k}={v}\n" for k, v in lines)
    with contextlib.suppress(WireGuardError):
        parse_get(text + "errno=0\n\n")


def test_clamp() -> None:
    k = clamp(b"\xff" * 32)
    assert k[0] == 0xF8 and k[31] == 0x7F
    assert clamp(k) == k


def test_interface_config_validation() -> None:
    ok: dict[str, Any] = dict(
        name="mesh0",
        private_key=bytes(32),
        listen_port=51820,
        ipv4="10.200.0.1",
        ipv6="fd00:200::1",
        cidr4="10.200.0.0/16",
        cidr6="fd00:200::/48",
    )
    assert InterfaceConfig(**ok).routes == ("10.200.0.0/16", "fd00:200::/48")
    for bad in (
        {"name": "x" * 16},
        {"name": "a/b"},
        {"ipv4": "fd00::1"},
        {"cidr6": "10.0.0.0/8"},
        {"mtu": 1000},
        {"private_key": b"short"},
    ):
        with pytest.raises(WireGuardError):
            InterfaceConfig(**(ok | bad))


# ------------------------------------------------------------------ kernel dump merging


class _Nla(dict[str, Any]):
    """Stands in for a decoded pyroute2 message: ``get_attr`` by name."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__()
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def _ip(cidr: str) -> dict[str, str]:
    return {"addr": cidr}


def test_merge_dump_stitches_a_peer_split_across_messages() -> None:
    b1, b2 = b64encode(K1), b64encode(K2)
    first = _Nla(
        WGDEVICE_A_PRIVATE_KEY=b64encode(bytes(range(1, 33))),
        WGDEVICE_A_LISTEN_PORT=51820,
        WGDEVICE_A_PEERS=[
            _Nla(
                WGPEER_A_PUBLIC_KEY=b1,
                WGPEER_A_ENDPOINT={"addr": "192.0.2.1", "port": 51820},
                WGPEER_A_LAST_HANDSHAKE_TIME={"tv_sec": 1_790_000_000, "tv_nsec": 0},
                WGPEER_A_RX_BYTES=10,
                WGPEER_A_TX_BYTES=20,
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL=25,
                WGPEER_A_ALLOWEDIPS=[_ip("10.0.0.1/32")],
            )
        ],
    )
    # The kernel continues the same peer (key only) with the rest of its allowed IPs,
    # then the next peer.
    second = _Nla(
        WGDEVICE_A_PEERS=[
            _Nla(WGPEER_A_PUBLIC_KEY=b1, WGPEER_A_ALLOWEDIPS=[_ip("fd00::1/128")]),
            _Nla(
                WGPEER_A_PUBLIC_KEY=b2,
                WGPEER_A_ENDPOINT={"addr": "fd00::9", "port": 7},
                WGPEER_A_LAST_HANDSHAKE_TIME={"tv_sec": 0, "tv_nsec": 0},
            ),
        ]
    )
    dev = merge_dump([first, second])
    assert dev.listen_port == 51820 and dev.private_key == bytes(range(1, 33))
    p1 = dev.peers[K1]
    assert p1.allowed_ips == {"10.0.0.1/32", "fd00::1/128"}
    assert (p1.endpoint, p1.rx_bytes, p1.tx_bytes, p1.keepalive) == ("192.0.2.1:51820", 10, 20, 25)
    assert p1.last_handshake == 1_790_000_000
    assert dev.peers[K2].endpoint == "[fd00::9]:7" and dev.peers[K2].last_handshake is None


def test_peer_request() -> None:
    spec = PeerSpec(K1, "[fd00::1]:51820", frozenset({"10.0.0.2/32"}), 25)
    assert peer_request(AddPeer(spec)) == {
        "public_key": b64encode(K1).decode(),
        "endpoint_addr": "fd00::1",
        "endpoint_port": 51820,
        "persistent_keepalive": 25,
        "replace_allowed_ips": True,
        "allowed_ips": ["10.0.0.2/32"],
    }
    assert peer_request(RemovePeer(K1)) == {"public_key": b64encode(K1).decode(), "remove": True}
    assert peer_request(UpdatePeer(K1, keepalive=0))["update_only"] is True
