"""Mapping between a :class:`~meshd.core.node.Node` and its data directory.

Secrets go to key files (mode 0600), everything else to ``state.json``. A new
node's files are written keys first and ``state.json`` last, because the state
file's presence is what marks a directory initialised: a crash in between leaves
an uninitialised directory that the next ``init``/``join`` overwrites.
"""

from __future__ import annotations

import os
from typing import Any

from meshd.core.admission import TokenLedger
from meshd.core.crypto import SigningKey, WireGuardKey
from meshd.core.ipam import AddressPlan, BlockAllocator, IpamError, LeaseTable
from meshd.core.membership import MemberState, Timing
from meshd.core.node import Node, NodeConfig, blob_from_json
from meshd.core.records import DEFAULT_WG_PORT
from meshd.core.wire import KEY_LEN, Keyring, WireError
from meshd.state import DataDir, StateError

KEY_NODE = "node"
KEY_WG = "wg"
KEY_CA = "ca"
KEY_KEYRING = "keyring"
KEY_TOKEN = "token"
ALL_KEYS = (KEY_NODE, KEY_WG, KEY_CA, KEY_KEYRING, KEY_TOKEN)


def save_new(datadir: DataDir, node: Node, settings: dict[str, Any]) -> None:
    """Persist a freshly created or joined node; on failure remove what was written."""
    datadir.ensure()
    try:
        datadir.write_key(KEY_NODE, node.sign.seed)
        datadir.write_key(KEY_WG, node.wg.private)
        if node.ca is not None:
            datadir.write_key(KEY_CA, node.ca.seed)
        datadir.write_key(KEY_TOKEN, node.token_key)
        save_keyring(datadir, node.keyring)
        save(datadir, node, settings)
    except BaseException:
        datadir.remove_all([*(f"{k}.key" for k in ALL_KEYS), "state.json"])
        raise


def save_keyring(datadir: DataDir, keyring: Keyring) -> None:
    datadir.write_key(KEY_KEYRING, b"".join(keyring.keys()))


def save(datadir: DataDir, node: Node, settings: dict[str, Any]) -> None:
    """Write the node's current snapshot (atomically) together with its settings."""
    datadir.write_state({**node.snapshot(), "settings": settings})


def load(datadir: DataDir, now: float, timing: Timing | None = None) -> tuple[Node, dict[str, Any]]:
    """Rebuild the node from its data directory; StateError naming the file on any problem.

    The SWIM incarnation restarts one above the persisted one, so this life of the node
    outbids whatever the cluster last heard about the previous one (a DEAD included).
    """
    state = datadir.read_state()
    path = datadir.path / "state.json"
    try:
        swim = state.get("swim") or {"incarnation": 0, "view": {}}
        view = {bytes.fromhex(k): (MemberState(v[0]), int(v[1])) for k, v in swim["view"].items()}
        cluster, me = state["cluster"], state["node"]
        plan = AddressPlan.from_dict(cluster["plan"])
        ring = datadir.read_key(KEY_KEYRING)
        if not ring or len(ring) % KEY_LEN:
            raise StateError(datadir.path / "keyring.key", "is not a list of 32-byte keys")
        ca = SigningKey(datadir.read_key(KEY_CA)) if datadir.has_key(KEY_CA) else None
        table = state.get("lease_table")
        sign = SigningKey(datadir.read_key(KEY_NODE))
        if sign.node_id.hex() != me["id"]:
            raise StateError(datadir.path / "node.key", "does not belong to the node in state.json")
        node = Node(
            sign=sign,
            wg=WireGuardKey(datadir.read_key(KEY_WG)),
            ca_public=bytes.fromhex(cluster["ca_public"]),
            ca=ca,
            keyring=Keyring([ring[i : i + KEY_LEN] for i in range(0, len(ring), KEY_LEN)]),
            token_key=datadir.read_key(KEY_TOKEN),
            plan=plan,
            config=NodeConfig(
                name=me["name"],
                hostname=me.get("hostname"),
                endpoints=list(me.get("endpoints", [])),
                zone=cluster["zone"],
                version=me.get("version", ""),
                wg_port=int(me.get("wg_port", DEFAULT_WG_PORT)),
            ),
            leader=bytes.fromhex(cluster["leader"]),
            admission=blob_from_json(me["admission"]),
            seq=int(me["seq"]),
            now=now,
            random_bytes=os.urandom,
            allocator=BlockAllocator.from_dict(plan, state["allocator"]),
            my_leases=[blob_from_json(x) for x in state.get("my_leases", [])],
            lease_table=LeaseTable.from_list(plan, table) if table is not None else None,
            ledger=TokenLedger(state.get("tokens") or {}),
            records=[blob_from_json(x) for x in state.get("members", [])],
            leases=[blob_from_json(x) for x in state.get("leases", [])],
            left=bool(me.get("left", False)),
            timing=timing,
            incarnation=int(swim["incarnation"]) + 1,
            view=view,
        )
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, IpamError, WireError) as exc:
        raise StateError(path, f"is inconsistent: {type(exc).__name__}: {exc}") from None
    settings = state.get("settings")
    return node, settings if isinstance(settings, dict) else {}
