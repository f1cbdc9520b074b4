"""The userspace backend: a supervised ``wireguard-go -f IFNAME`` and its UAPI socket.

* **Start.** If ``/var/run/wireguard/IFNAME.sock`` answers and the link exists in this
  network namespace, the running wireguard-go is adopted (an agent restarted after a
  crash keeps every tunnel up). If the socket answers but the link is not in this
  namespace, the name is taken elsewhere: the socket directory is shared by all
  namespaces, so that is an error, not something to adopt. A dead socket file is
  removed, then wireguard-go is started in the foreground (``-f``) as our child, kept by
  PID, in its own session so a terminal's Ctrl-C reaches only the agent, which then
  shuts it down in order.
* **Supervision.** When wireguard-go exits without being asked to, it is restarted
  with exponential backoff (0.2 s doubling to 10 s, reset after a minute of uptime),
  the device and link are configured again, and ``on_reset`` tells the reconciler
  that every peer is gone.
* **Stop.** SIGTERM to the PID (wireguard-go removes its interface and socket), SIGKILL
  after 3 s, then the link and the socket are removed if anything is left.

wireguard-go refuses to run on kernels with built-in WireGuard unless
``WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1`` is set; the backend sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Sequence

import structlog

from meshd.core.crypto import WireGuardKey
from meshd.core.wgplan import PeerOp, PeerStatus
from meshd.wg import link
from meshd.wg.base import InterfaceConfig, WireGuardBackend, WireGuardError, cancel_and_wait
from meshd.wg.uapi import (
    SOCKET_DIR,
    UapiClient,
    device_changes,
    encode_device,
    encode_ops,
    socket_path,
)

log = structlog.get_logger("meshd.wg")

BINARY = "wireguard-go"
START_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
RESTART_MIN = 0.2
RESTART_MAX = 10.0
#: A wireguard-go that ran this long resets the restart backoff.
STABLE_AFTER = 60.0
ADOPTED_POLL = 1.0


def find_binary(binary: str = BINARY) -> str | None:
    return shutil.which(binary)


def find_pid(interface: str) -> int | None:
    """The PID of a ``wireguard-go ... IFNAME`` process (for an adopted daemon)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        names = [os.path.basename(a) for a in argv if a]
        if BINARY.encode() in names and interface.encode() in names:
            return int(entry.name)
    return None


class UserspaceBackend(WireGuardBackend):
    kind = "userspace"

    def __init__(
        self,
        interface: str,
        *,
        binary: str = BINARY,
        socket_dir: str = SOCKET_DIR,
        netns: str | None = None,
        restart_min: float = RESTART_MIN,
        restart_max: float = RESTART_MAX,
        start_timeout: float = START_TIMEOUT,
        log_level: str = "error",
    ) -> None:
        super().__init__(interface)
        self.binary = binary
        self.netns = netns
        self.socket_path = socket_path(interface, socket_dir)
        self.uapi = UapiClient(self.socket_path)
        self.restart_min = restart_min
        self.restart_max = restart_max
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.config: InterfaceConfig | None = None
        self.pid: int | None = None
        self.adopted = False
        self.output: deque[str] = deque(maxlen=50)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._started_at = 0.0

    # ------------------------------------------------------------------------ backend

    async def open(self, config: InterfaceConfig) -> None:
        if config.name != self.interface:
            raise WireGuardError(f"config is for {config.name}, backend for {self.interface}")
        self.config = config
        self._closing = False
        await self._ensure_running()
        await self.configure(config)
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name="wireguard-go")

    async def configure(self, config: InterfaceConfig) -> int:
        self.config = config
        key, port = device_changes(await self.uapi.get(), config)
        lines = encode_device(private_key=key, listen_port=port)
        writes = 0
        if lines:
            await self.uapi.set(lines)
            self.stats.device_writes += 1
            writes = 1
        return writes + await link.configure_link(self.netns, config, self.stats)

    async def peers(self) -> dict[bytes, PeerStatus]:
        return (await self.uapi.get()).peers

    async def apply(self, ops: Sequence[PeerOp]) -> None:
        if not ops:
            return
        try:
            await self.uapi.set(encode_ops(ops))
        except WireGuardError:
            self.stats.errors += 1
            raise
        self.stats.device_writes += 1
        self.stats.peer_ops += len(ops)

    async def public_key(self) -> bytes | None:
        dev = await self.uapi.get()
        return None if dev.private_key is None else WireGuardKey(dev.private_key).public

    async def close(self) -> None:
        self._closing = True
        await cancel_and_wait(self._supervisor)
        self._supervisor = None
        await self._stop_process()
        with contextlib.suppress(WireGuardError, OSError):
            async with link.iproute(self.netns) as ipr:
                await link.delete_link(ipr, self.interface)
        if not await self.uapi.alive():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        await cancel_and_wait(self._reader)
        self._reader = None
        self.pid = None

    @property
    def closing(self) -> bool:
        return self._closing

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.kind,
            "interface": self.interface,
            "pid": self.pid,
            "adopted": self.adopted,
            "restarts": self.stats.restarts,
            "socket": self.socket_path,
        }

    # ---------------------------------------------------------------------- process

    async def _ensure_running(self) -> None:
        if await self.uapi.alive():
            async with link.iproute(self.netns) as ipr:
                index = await link.link_index(ipr, self.interface)
            if index is None:
                raise WireGuardError(
                    f"interface name {self.interface} is already used by a wireguard-go in "
                    f"another network namespace ({self.socket_path} is shared by all "
                    "namespaces); choose another --interface"
                )
            self.pid = find_pid(self.interface)
            self.adopted = True
            self._started_at = time.monotonic()
            log.info("adopted running wireguard-go", interface=self.interface, pid=self.pid)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # stale: nothing answers on it
        await self._spawn()

    async def _spawn(self) -> None:
        binary = find_binary(self.binary) if os.sep not in self.binary else self.binary
        if binary is None:
            raise WireGuardError(
                f"{self.binary} is not installed (Debian: apt-get install wireguard-go)"
            )
        cmd = [binary, "-f", self.interface]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ)
        env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
        env["LOG_LEVEL"] = self.log_level
        self.output.clear()
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise WireGuardError(f"cannot start {binary}: {exc.strerror or exc}") from None
        self._proc, self.pid, self.adopted = proc, proc.pid, False
        self._started_at = time.monotonic()
        if self._reader is not None:
            self._reader.cancel()
        self._reader = asyncio.create_task(self._read_output(proc))
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        while True:
            if proc.returncode is not None:
                await asyncio.sleep(0.05)  # let the reader catch the last words
                raise WireGuardError(
                    f"wireguard-go exited with status {proc.returncode} while creating "
                    f"{self.interface}: {self._last_output()}"
                )
            if await self.uapi.alive():
                break
            if time.monotonic() > deadline:
                await self._stop_process()
                raise WireGuardError(
                    f"wireguard-go did not open {self.socket_path} within "
                    f"{self.start_timeout:g} s: {self._last_output()}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        log.info("started wireguard-go", interface=self.interface, pid=proc.pid)

    def _last_output(self) -> str:
        lines = [ln for ln in self.output if ln.strip() and not ln.startswith(("┌", "│", "└"))]
        return " / ".join(lines[-3:]) or "no output"

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self.output.append(text)
            if text.strip() and not text.startswith(("┌", "│", "└")):
                log.debug("wireguard-go", interface=self.interface, line=text)

    async def _wait_exit(self) -> int | None:
        """Until our wireguard-go (child or adopted) is gone; its status if a child."""
        if self._proc is not None:
            return await self._proc.wait()
        while True:
            if self.pid is not None:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    return None
            elif not await self.uapi.alive():
                return None
            await asyncio.sleep(ADOPTED_POLL)

    async def _supervise(self) -> None:
        backoff = self.restart_min
        while not self._closing:
            status = await self._wait_exit()
            if self.closing:
                return
            self._proc = None
            if time.monotonic() - self._started_at > STABLE_AFTER:
                backoff = self.restart_min
            self.stats.restarts += 1
            log.warning(
                "wireguard-go exited; restarting",
                interface=self.interface,
                pid=self.pid,
                status=status,
                output=self._last_output(),
                backoff=backoff,
            )
            while not self._closing:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.restart_max)
                try:
                    await self._ensure_running()
                    if self.config is not None:
                        await self.configure(self.config)
                    break
                except (WireGuardError, OSError) as exc:
                    self.stats.errors += 1
                    log.warning("wireguard-go restart failed", error=str(exc), backoff=backoff)
            self._reset()

    async def _stop_process(self) -> None:
        proc, pid = self._proc, self.pid
        self._proc = None
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if proc is not None:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await proc.wait()
            return
        deadline = time.monotonic() + STOP_TIMEOUT  # adopted: not our child, poll
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
