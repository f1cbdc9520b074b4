"""The record pull of a simulated node: the node's own code,
:class:`meshd.core.pull.RecordPull`, run for every simulated node over a plain "version
held" lookup (no store, no signatures), announced with the node's own
:func:`meshd.core.pull.announcement`.
"""

from __future__ import annotations

from meshd.core.pull import RecordPull, announcement

__all__ = ["RecordPull", "announcement"]
