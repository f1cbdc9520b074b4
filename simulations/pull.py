"""The announcement a simulated node gossips for a new record version.

The pull that follows is the node's own code, :class:`meshd.core.pull.RecordPull`, run
for every simulated node over a plain "version held" lookup (no store, no signatures).
"""

from __future__ import annotations

from typing import Any

from meshd.core.pull import RecordPull

__all__ = ["RecordPull", "announcement"]


def announcement(node_id: bytes, seq: int) -> tuple[dict[str, Any], bytes]:
    """``Node._broadcast_record``'s item and queue key."""
    return {"k": "v", "id": node_id, "s": seq}, b"r" + node_id
