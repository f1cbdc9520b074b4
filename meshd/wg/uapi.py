"""WireGuard's cross-platform userspace API (UAPI) over a unix socket, with asyncio.

Protocol (https://www.wireguard.com/xplatform/): a request is ``get=1`` or ``set=1``
followed by ``key=value`` lines and an empty line; the answer to ``set`` is
``errno=N`` and an empty line, the answer to ``get`` is the device's ``key=value``
lines followed by ``errno=N`` and an empty line. Keys are lower-case hex here (base64
in ``wg`` and netlink). A ``set`` is applied line by line: a failing line leaves the
earlier ones applied, which the level-triggered reconciler tolerates by re-reading.

The codec (:func:`encode_set`, :func:`parse_get`) is pure; :class:`UapiClient` opens
one connection per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshd.core.wgplan import (
    AddPeer,
    PeerOp,
    PeerStatus,
    RemovePeer,
    endpoint_or_none,
    normalize_cidr,
)
from meshd.wg.base import InterfaceConfig, WireGuardError

SOCKET_DIR = "/var/run/wireguard"
#: A get of 1,000 peers is ~400 KB; refuse anything absurd rather than buffer it.
MAX_RESPONSE = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0


class UapiError(WireGuardError):
    def __init__(self, errno: int, what: str) -> None:
        super().__init__(f"wireguard-go refused the {what} (errno {errno})")
        self.errno = errno


def socket_path(interface: str, socket_dir: str = SOCKET_DIR) -> str:
    return os.path.join(socket_dir, interface + ".sock")


def clamp(private_key: bytes) -> bytes:
    """X25519 clamping (RFC 7748): what WireGuard stores for a private key."""
    k = bytearray(private_key)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


@dataclass
class DeviceState:
    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[bytes, PeerStatus] = field(default_factory=dict)


def device_changes(dev: DeviceState, config: InterfaceConfig) -> tuple[bytes | None, int | None]:
    """The private key and listen port to write so that ``dev`` matches ``config``; None
    where it already does (both backends write only what differs: idempotent setup)."""
    key = clamp(config.private_key)
    port = config.listen_port
    return (
        key if dev.private_key != key else None,
        port if port and dev.listen_port != port else None,
    )


# ---------------------------------------------------------------------------- codec


def encode_device(
    private_key: bytes | None = None, listen_port: int | None = None, replace_peers: bool = False
) -> list[str]:
    lines = []
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if replace_peers:
        lines.append("replace_peers=true")
    return lines


def encode_ops(ops: Sequence[PeerOp]) -> list[str]:
    """``set`` lines for peer operations, in order."""
    lines: list[str] = []
    endpoint: str | None
    ips: frozenset[str] | None
    keepalive: int | None
    for op in ops:
        if isinstance(op, RemovePeer):
            lines += [f"public_key={op.public_key.hex()}", "remove=true"]
            continue
        if isinstance(op, AddPeer):
            p = op.peer
            lines.append(f"public_key={p.public_key.hex()}")
            endpoint, ips, keepalive = p.endpoint, p.allowed_ips, p.keepalive
        else:
            lines += [f"public_key={op.public_key.hex()}", "update_only=true"]
            endpoint, ips, keepalive = op.endpoint, op.allowed_ips, op.keepalive
        if endpoint is not None:
            lines.append(f"endpoint={endpoint}")
        if keepalive is not None:
            lines.append(f"persistent_keepalive_interval={keepalive}")
        if ips is not None:
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={ip}" for ip in sorted(ips)]
    return lines


def encode_set(lines: Sequence[str]) -> bytes:
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"bad UAPI line {line!r}")
    return ("set=1\n" + "".join(line + "\n" for line in lines) + "\n").encode()


def parse_errno(text: str) -> int:
    """The ``errno=N`` that ends every answer."""
    lines = [ln for ln in text.split("\n") if ln]
    if not lines or not lines[-1].startswith("errno="):
        raise WireGuardError("wireguard-go answered without an errno line")
    try:
        return int(lines[-1].removeprefix("errno="))
    except ValueError:
        raise WireGuardError(f"wireguard-go answered with a bad {lines[-1]!r}") from None


def _hexkey(value: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise WireGuardError(f"wireguard-go sent a {what} that is not hex") from None
    if len(raw) != 32:
        raise WireGuardError(f"wireguard-go sent a {what} of {len(raw)} bytes")
    return raw


@dataclass
class _PeerBuilder:
    key: bytes
    endpoint: str | None = None
    ips: set[str] = field(default_factory=set)
    ints: dict[str, int] = field(default_factory=dict)

    def build(self) -> PeerStatus:
        sec = self.ints.get("last_handshake_time_sec", 0)
        nsec = self.ints.get("last_handshake_time_nsec", 0)
        return PeerStatus(
            public_key=self.key,
            endpoint=self.endpoint,
            allowed_ips=frozenset(self.ips),
            keepalive=self.ints.get("persistent_keepalive_interval", 0),
            last_handshake=(sec + nsec / 1e9) if sec or nsec else None,
            rx_bytes=self.ints.get("rx_bytes", 0),
            tx_bytes=self.ints.get("tx_bytes", 0),
        )


_PEER_INTS = frozenset(
    {
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "tx_bytes",
        "rx_bytes",
        "persistent_keepalive_interval",
    }
)


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise WireGuardError(f"wireguard-go sent a bad {key}: {value[:30]!r}") from None


def parse_get(text: str) -> DeviceState:
    """The answer to ``get=1``: device fields, then one block per peer from
    ``public_key=`` on. Unknown keys are skipped (newer wireguard-go versions)."""
    errno = parse_errno(text)
    if errno != 0:
        raise UapiError(errno, "get")
    dev = DeviceState()
    peers: list[_PeerBuilder] = []
    for line in text.split("\n"):
        if not line or line.startswith("errno="):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(f"wireguard-go sent a line without '=': {line[:60]!r}")
        if key == "public_key":
            peers.append(_PeerBuilder(_hexkey(value, "public key")))
        elif not peers:
            if key == "private_key":
                raw = _hexkey(value, "private key")
                dev.private_key = raw if any(raw) else None
            elif key == "listen_port":
                dev.listen_port = _int(key, value)
            elif key == "fwmark":
                dev.fwmark = _int(key, value)
        elif key == "endpoint":
            peers[-1].endpoint = endpoint_or_none(value)
        elif key == "allowed_ip":
            try:
                peers[-1].ips.add(normalize_cidr(value))
            except ValueError:
                raise WireGuardError(f"wireguard-go sent a bad allowed_ip {value[:50]!r}") from None
        elif key in _PEER_INTS:
            peers[-1].ints[key] = _int(key, value)
    for b in peers:
        dev.peers[b.key] = b.build()
    return dev


# --------------------------------------------------------------------------- client


class UapiClient:
    """Requests to one wireguard-go's control socket. Counts ``set`` transactions."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.sets = 0
        self.gets = 0

    async def _request(self, payload: bytes) -> str:
        async def talk() -> bytes:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_RESPONSE)
            try:
                writer.write(payload)
                await writer.drain()
                return await reader.readuntil(b"\n\n")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        try:
            async with asyncio.timeout(self.timeout):
                data = await talk()
        except TimeoutError:
            raise WireGuardError(
                f"wireguard-go did not answer on {self.path} within {self.timeout:g} s"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise WireGuardError(f"wireguard-go is not running ({self.path} is gone)") from None
        except asyncio.IncompleteReadError:
            raise WireGuardError(f"wireguard-go closed {self.path} mid-answer") from None
        except asyncio.LimitOverrunError:
            raise WireGuardError(f"wireguard-go sent more than {MAX_RESPONSE} bytes") from None
        except OSError as exc:
            raise WireGuardError(f"cannot talk to wireguard-go on {self.path}: {exc}") from None
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise WireGuardError("wireguard-go answered with bytes that are not text") from None

    async def get(self) -> DeviceState:
        self.gets += 1
        return parse_get(await self._request(b"get=1\n\n"))

    async def set(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        self.sets += 1
        errno = parse_errno(await self._request(encode_set(lines)))
        if errno != 0:
            raise UapiError(errno, "configuration change")

    async def alive(self) -> bool:
        try:
            await self._request(b"get=1\n\n")
        except WireGuardError:
            return False
        return True
