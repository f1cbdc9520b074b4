"""WireGuard data plane: one backend interface, three backends, and the reconciler.

``select_backend("auto")`` picks the kernel module when a wireguard link can be
created, else ``wireguard-go`` when it is on PATH, else fails naming what is missing.
"""

from __future__ import annotations

import os

from meshd.wg.base import (
    DEFAULT_MTU,
    BackendUnavailable,
    InterfaceConfig,
    WireGuardBackend,
    WireGuardError,
)
from meshd.wg.memory import MemoryBackend

BACKENDS = ("auto", "kernel", "userspace", "memory", "none")

__all__ = [
    "BACKENDS",
    "DEFAULT_MTU",
    "BackendUnavailable",
    "InterfaceConfig",
    "MemoryBackend",
    "WireGuardBackend",
    "WireGuardError",
    "select_backend",
]


async def select_backend(
    name: str, interface: str, *, netns: str | None = None
) -> WireGuardBackend | None:
    """The backend called ``name`` for ``interface`` (None for "none"); raises
    :class:`BackendUnavailable` with a one-sentence reason when it cannot run here."""
    from meshd.wg.kernel import KernelBackend, kernel_support
    from meshd.wg.userspace import UserspaceBackend, find_binary

    if name == "none":
        return None
    if name == "memory":
        return MemoryBackend(interface)
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown WireGuard backend {name!r} (one of {BACKENDS})")
    root = os.geteuid() == 0
    if name in ("kernel", "auto"):
        ok, why = await kernel_support(netns) if root else (False, "not running as root")
        if ok:
            return KernelBackend(interface, netns=netns)
        if name == "kernel":
            raise BackendUnavailable(f"the kernel WireGuard backend is not available: {why}")
        kernel_why = why
    if not root:
        raise BackendUnavailable(
            f"the {name} WireGuard backend needs root (CAP_NET_ADMIN) to create {interface}; "
            "run as root or use --wg-backend none"
        )
    if find_binary() is None:
        if name == "userspace":
            raise BackendUnavailable(
                "wireguard-go is not on PATH (Debian: apt-get install wireguard-go)"
            )
        raise BackendUnavailable(
            f"no WireGuard backend: {kernel_why}, and wireguard-go is not on PATH "
            "(Debian: apt-get install wireguard-go), or run with --wg-backend none"
        )
    return UserspaceBackend(interface, netns=netns)
