"""A tiny deterministic network for driving meshd cores in tests (fake clock, no sockets)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from meshd.core.crypto import SigningKey, WireGuardKey
from meshd.core.ipam import AddressPlan
from meshd.core.join import JoinClient, JoinFailed, JoinSucceeded
from meshd.core.node import Event, Node, NodeConfig
from meshd.core.wire import Addr, Keyring


class Rand:
    """Seeded stand-in for os.urandom so runs are reproducible."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self._r.randbytes(n)


@dataclass
class Net:
    """Delivers datagrams between registered endpoints; drop_fn decides losses."""

    now: float = 1_790_000_000.0
    rand: Rand = field(default_factory=lambda: Rand(1))
    nodes: dict[Addr, Node] = field(default_factory=dict)
    clients: dict[Addr, JoinClient] = field(default_factory=dict)
    events: dict[Addr, list[Event]] = field(default_factory=dict)
    drop_fn: Callable[[bytes, Addr, Addr], bool] = lambda data, src, dst: False
    sent: list[tuple[Addr, Addr, bytes]] = field(default_factory=list)
    persist_checks: list[Callable[[Addr, Node], None]] = field(default_factory=list)

    def config(self, name: str, addr: Addr) -> NodeConfig:
        return NodeConfig(
            name=name,
            hostname=None,
            endpoints=[f"{addr[0]}:{addr[1]}"],
            zone="mesh.internal.",
            version="test",
        )

    def init(self, name: str, addr: Addr, plan: AddressPlan | None = None) -> Node:
        node = Node.create_cluster(
            sign=SigningKey(self.rand(32)),
            wg=WireGuardKey(self.rand(32)),
            ca=SigningKey(self.rand(32)),
            keyring=Keyring([self.rand(32)]),
            token_key=self.rand(32),
            plan=plan or AddressPlan.parse("10.200.0.0/16", "fd00:200::/48"),
            config=self.config(name, addr),
            now=self.now,
            random_bytes=self.rand,
        )
        self.add(addr, node)
        return node

    def add(self, addr: Addr, node: Node) -> None:
        self.nodes[addr] = node
        self.events.setdefault(addr, [])
        node.announce(self.now)

    def join_client(
        self, addr: Addr, token: str, seeds: list[Addr], name: str = "joiner", timeout: float = 30
    ) -> tuple[JoinClient, SigningKey, WireGuardKey]:
        sign, wg = SigningKey(self.rand(32)), WireGuardKey(self.rand(32))
        client = JoinClient(
            token=token,
            seeds=seeds,
            sign=sign,
            wg_key=wg.public,
            reply_key=WireGuardKey(self.rand(32)),
            request_id=self.rand(16),
            name=name,
            hostname=None,
            endpoints=[f"{addr[0]}:{addr[1]}"],
            now=self.now,
            timeout=timeout,
        )
        self.clients[addr] = client
        return client, sign, wg

    def join(
        self, name: str, addr: Addr, token: str, seeds: list[Addr], max_time: float = 40
    ) -> Node | JoinFailed:
        """Run a complete join, then start the new member on ``addr``."""
        client, sign, wg = self.join_client(addr, token, seeds, name)
        result = self.run_until(lambda: client.next_event(), max_time)
        del self.clients[addr]
        if isinstance(result, JoinFailed):
            return result
        assert isinstance(result, JoinSucceeded)
        node = Node.from_grant(
            result.grant,
            sign=sign,
            wg=wg,
            config=self.config(name, addr),
            now=self.now,
            random_bytes=self.rand,
        )
        self.add(addr, node)
        self.settle()
        # The new record spreads by gossip: wait (bounded) until every member has it.
        nid = node.sign.node_id
        self.run_until(lambda: all(n.store.get(nid) for n in self.nodes.values()) or None, 10)
        return node

    # -- driving -----------------------------------------------------------------------

    def step(self) -> bool:
        """Deliver everything queued; return True if anything moved."""
        moved = False
        for addr, node in list(self.nodes.items()):
            for check in self.persist_checks:
                check(addr, node)
            if node.dirty:
                node.snapshot()  # the agent persists before sending
            for data, dst in node.datagrams_to_send():
                moved = True
                self._deliver(addr, dst, data)
            while (ev := node.next_event()) is not None:
                self.events[addr].append(ev)
        for addr, client in list(self.clients.items()):
            for data, dst in client.datagrams_to_send():
                moved = True
                self._deliver(addr, dst, data)
        return moved

    def _deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        self.sent.append((src, dst, data))
        if self.drop_fn(data, src, dst):
            return
        if dst in self.nodes:
            self.nodes[dst].receive(data, src, self.now)
        elif dst in self.clients:
            self.clients[dst].receive(data, src, self.now)

    def fire_timers(self) -> None:
        for node in self.nodes.values():
            t = node.get_timer()
            if t is not None and t <= self.now:
                node.handle_timer(self.now)
        for client in self.clients.values():
            t = client.get_timer()
            if t is not None and t <= self.now:
                client.handle_timer(self.now)

    def next_timer(self) -> float | None:
        times = [n.get_timer() for n in self.nodes.values()]
        times += [c.get_timer() for c in self.clients.values()]
        live = [t for t in times if t is not None]
        return min(live) if live else None

    def settle(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("network did not settle")

    def run_until(self, probe: Callable[[], object], max_time: float) -> object:
        """Advance virtual time event by event until probe() returns something."""
        end = self.now + max_time
        for _ in range(100_000):
            self.fire_timers()
            self.settle()
            result = probe()
            if result is not None:
                return result
            t = self.next_timer()
            if t is None or t > end:
                return None
            self.now = max(self.now, t)
        raise AssertionError("run_until did not finish")

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            self.fire_timers()
            self.settle()
            t = self.next_timer()
            if t is None or t > end:
                self.now = end
                return
            self.now = max(self.now, t)
