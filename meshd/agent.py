"""The composition root: one member's core wired to its UDP socket, data dir and HTTP endpoint.

The agent owns no protocol decisions. It feeds the core (datagrams, timer) and
carries out what the core asks, in one fixed order per step: persist critical
state, then send datagrams, then log events. That order is what makes a join
reply safe to send: the address it hands out is on disk first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import ipaddress
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from meshd import persist
from meshd.core import node as core
from meshd.core.admission import cluster_id
from meshd.core.join import JoinClient, JoinFailed, JoinSucceeded
from meshd.core.membership import (
    MemberJoined,
    MemberRemoved,
    MemberState,
    MemberStateChanged,
    Refuted,
)
from meshd.core.naming import Conflict, ZoneView
from meshd.core.node import Node
from meshd.core.paths import PathChanged
from meshd.core.wire import Addr, format_hostport, split_hostport
from meshd.dns import DnsConfig, DnsServer, bind_socket, default_upstreams, listen_addresses
from meshd.state import DataDir, atomic_write
from meshd.wg.dataplane import DataPlane

log = structlog.get_logger("meshd.agent")

VIEW_FLUSH_INTERVAL = 10.0
RUN_FILE = "run.json"
HTTP_TOKEN_KEY = "http"


def parse_hostport(text: str, default_port: int | None = None) -> Addr:
    """User-supplied ``host:port``; an empty host means every address."""
    host, port = split_hostport(text, default_port)
    return host or "0.0.0.0", port


@dataclass
class Metrics:
    """Counters the HTTP endpoint exposes; the core keeps its own drop counts."""

    started: float = field(default_factory=time.time)
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    send_errors: int = 0
    state_writes: int = 0
    events: Counter[str] = field(default_factory=Counter)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.agent.on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.agent.metrics.send_errors += 1


#: A join never needs more timer wake-ups than this (backoff from 250 ms to its deadline).
MAX_JOIN_WAKEUPS = 1_000


async def drive_join(
    client: JoinClient,
    *,
    on_send: Callable[[bytes], None] | None = None,
    on_receive: Callable[[bytes], None] | None = None,
) -> JoinSucceeded | JoinFailed:
    """The join's asyncio adapter: one UDP socket, the client's timer, its datagrams.

    ``on_send``/``on_receive`` see every datagram (the join benchmark counts them)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[JoinSucceeded | JoinFailed] = loop.create_future()
    family = socket.AF_INET6 if ":" in client.seeds[0][0] else socket.AF_INET

    def pump() -> None:
        for data, addr in client.datagrams_to_send():
            with contextlib.suppress(OSError):
                transport.sendto(data, addr)
                if on_send is not None:
                    on_send(data)
        event = client.next_event()
        if event is not None and not done.done():
            done.set_result(event)

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if on_receive is not None:
                on_receive(data)
            client.receive(data, (addr[0], addr[1]), time.time())
            pump()

    transport, _ = await loop.create_datagram_endpoint(Proto, family=family)
    try:
        for _ in range(MAX_JOIN_WAKEUPS):
            when = client.get_timer()
            if done.done() or when is None:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), max(0.0, when - time.time()))
            if not done.done():
                client.handle_timer(time.time())
                pump()
        return done.result() if done.done() else JoinFailed("the join did not finish")
    finally:
        transport.close()


class Agent:
    """Runs one node until stopped."""

    def __init__(
        self,
        datadir: DataDir,
        node: Node,
        settings: dict[str, Any],
        *,
        http: Addr | None,
        dns: DnsConfig | None = None,
        wg: DataPlane | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.datadir = datadir
        self.node = node
        self.settings = settings
        self.http_addr = http
        self.clock = clock
        self.metrics = Metrics()
        self.stopped = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        #: Gossip sockets on the overlay addresses, by address family (the tunnel path);
        #: a family missing here is served by the main socket if that is a wildcard.
        self._overlay: dict[int, asyncio.DatagramTransport] = {}
        self.overlay_listen: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._view_flush: asyncio.TimerHandle | None = None
        self._http_server: Any = None
        self._http_token = ""
        self._leave_done: asyncio.Future[bool] | None = None
        self.dns_config = dns
        #: WireGuard interface + peer reconciler (None: --wg-backend none).
        self.wg = wg
        self.dns: DnsServer | None = None
        self.zone = ZoneView(
            node.plan, node.config.zone, self_id=node.sign.node_id, leader=node.leader
        )
        self._conflicts: set[Conflict] = set()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = parse_hostport(self.settings["listen"])
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=listen
        )
        bound = self._transport.get_extra_info("sockname")
        self.listen_addr: Addr = (bound[0], bound[1])
        if self.wg is not None:  # first: DNS binds to the overlay addresses it installs
            try:
                await self.wg.start()
            except BaseException:
                self._transport.close()
                raise
            self.wg.after_report = self._pump
            await self._listen_overlay()
        if self.dns_config is not None:
            self._zone_sync()
            try:
                await self._start_dns(self.dns_config)
            except OSError:
                self._transport.close()  # nothing of a failed start stays behind
                if self.wg is not None:
                    await self.wg.stop()
                raise
        self._http_token = self._load_http_token()
        if self.http_addr is not None:
            from meshd.http import start_http

            self._http_server, self.http_bound = await start_http(self, self.http_addr)
        self._write_run_file()
        # The record says where to dial our WireGuard interface (0: we have none).
        self.node.config.wg_port = self.wg.wg_port if self.wg is not None else 0
        self.node.announce(self.clock())
        self._pump()
        self._zone_sync()
        self._schedule_view_flush()
        v4, v6 = self.node.addresses()
        log.info(
            "agent started",
            node=self.node.config.name,
            id=self.node.sign.node_id.hex(),
            ipv4=v4,
            ipv6=v6,
            listen=format_hostport(self.listen_addr),
            http=format_hostport(self.http_bound) if self.http_addr else None,
            dns=[format_hostport(a) for a in self.dns.bound] if self.dns else None,
            leader=self.node.is_leader,
        )

    async def stop(self) -> None:
        for handle in (self._timer, self._view_flush):
            if handle is not None:
                handle.cancel()
        if self._http_server is not None:
            await self._http_server.close()
        if self.dns is not None:
            await self.dns.stop()
        if self.wg is not None:
            await self.wg.stop()  # removes the interface, stops wireguard-go
        for transport in self._overlay.values():
            transport.close()
        self._overlay.clear()
        if self._transport is not None:
            self._transport.close()
        self._persist()
        with contextlib.suppress(FileNotFoundError):
            (self.datadir.path / RUN_FILE).unlink()
        log.info("agent stopped", node=self.node.config.name)

    async def leave(self, wait: float = 10.0) -> bool:
        """Release leases through the core and wait (bounded) for the acknowledgements."""
        self._leave_done = asyncio.get_running_loop().create_future()
        self.node.leave(self.clock())
        self._pump()
        try:
            acknowledged = await asyncio.wait_for(asyncio.shield(self._leave_done), wait)
        except TimeoutError:
            acknowledged = False
        # Keep gossiping until our LEFT has been sent its retransmit limit (memberlist's
        # Leave waits for its broadcast the same way), bounded in time.
        timing = self.node.swim.timing
        deadline = self.clock() + max(1.0, 20 * timing.gossip_interval)
        for _ in range(1_000):  # bounded; the deadline ends it long before
            if not self.node.swim.queued or self.clock() >= deadline:
                break
            await asyncio.sleep(timing.gossip_interval / 2)
        self.stopped.set()
        return acknowledged

    def set_hostname(self, hostname: str | None) -> int:
        """Publish a new record with another extra DNS name; returns the record's seq."""
        self.node.set_hostname(hostname, self.clock())
        self._pump()
        self._zone_member(self.node.sign.node_id)
        return self.node.seq

    async def _listen_overlay(self) -> None:
        """Also receive gossip on the overlay addresses, at the advertised gossip port
        (where the others send once a tunnel is up). A wildcard main socket already
        receives it for its family and cannot share the port; then it serves that path."""
        loop = asyncio.get_running_loop()
        port = split_hostport(self.node.config.endpoints[0])[1]
        main = ipaddress.ip_address(self.listen_addr[0])
        for host in self.node.addresses():
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = bind_socket(host, port, socket.SOCK_DGRAM)
            except OSError as exc:
                covered = main.is_unspecified and (main.version == 6 or family == socket.AF_INET)
                if exc.errno == errno.EADDRINUSE and covered:
                    self.overlay_listen.append(format_hostport((host, port)) + " (main socket)")
                    continue
                log.warning(
                    "cannot listen for gossip on the overlay; the bootstrap channel carries it",
                    address=format_hostport((host, port)),
                    error=exc.strerror,
                )
                continue
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
            self._overlay[family] = transport
            self.overlay_listen.append(format_hostport((host, port)))

    def _socket_for(self, addr: Addr) -> tuple[asyncio.DatagramTransport, Addr]:
        """Overlay destinations leave from the overlay socket of their family (so the
        receiver sees our overlay address), everything else from the main socket."""
        assert self._transport is not None
        try:
            ip = ipaddress.ip_address(addr[0])
        except ValueError:
            return self._transport, addr
        plan = self.node.plan
        if ip in plan.cidr4 or ip in plan.cidr6:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            transport = self._overlay.get(family)
            if transport is not None:
                return transport, addr
            sock = self._transport.get_extra_info("socket")
            if ip.version == 4 and sock is not None and sock.family == socket.AF_INET6:
                return self._transport, (f"::ffff:{ip}", addr[1])
        return self._transport, addr

    # --------------------------------------------------------------- core driving

    def on_datagram(self, data: bytes, addr: Addr) -> None:
        self.metrics.rx_packets += 1
        self.metrics.rx_bytes += len(data)
        self.node.receive(data, addr, self.clock())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self.node.handle_timer(self.clock())
        self._pump()

    def _pump(self) -> None:
        """Persist, then send, then report, then re-arm the timer."""
        if self.node.dirty:
            self._persist()
        assert self._transport is not None
        for data, addr in self.node.datagrams_to_send():
            try:
                transport, dest = self._socket_for(addr)
                transport.sendto(data, dest)
                self.metrics.tx_packets += 1
                self.metrics.tx_bytes += len(data)
            except OSError:
                self.metrics.send_errors += 1
        while (event := self.node.next_event()) is not None:
            self._on_event(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.node.get_timer()
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, when - self.clock()), self._on_timer)

    def _persist(self) -> None:
        persist.save(self.datadir, self.node, self.settings)
        self.metrics.state_writes += 1

    def _schedule_view_flush(self) -> None:
        def flush() -> None:
            if self.node.view_dirty:
                self._persist()
            self._zone_sync()  # level-triggered safety net under the event-driven updates
            self._schedule_view_flush()

        loop = asyncio.get_running_loop()
        self._view_flush = loop.call_later(VIEW_FLUSH_INTERVAL, flush)

    def _on_event(self, event: core.Event) -> None:
        self.metrics.events[type(event).__name__] += 1
        if self.wg is not None:
            self.wg.trigger()  # level-triggered and coalesced: cheap on any event
        if isinstance(event, core.MemberUpdated):
            v4, v6 = event.record.addresses(self.node.plan)
            log.info(
                "member " + event.merge.value,
                name=event.record.name,
                id=event.record.node_id.hex(),
                ipv4=str(v4),
                ipv6=str(v6),
                seq=event.record.seq,
            )
        elif isinstance(event, core.Admitted):
            v4, _ = self.node.plan.address(event.offset)
            log.info("admitted joiner", name=event.name, id=event.node_id.hex(), ipv4=str(v4))
        elif isinstance(event, core.LeaseChanged):
            log.info(
                "lease " + ("released" if event.lease.released else "granted"),
                block=event.lease.block,
                holder=event.lease.holder.hex() or None,
            )
        elif isinstance(event, core.ControlFailed):
            log.warning("control request failed", op=event.op, reason=event.reason)
        elif isinstance(event, MemberStateChanged):
            rec = self.node.store.get(event.node_id)
            log.log(
                logging.WARNING
                if event.new in (MemberState.SUSPECT, MemberState.DEAD)
                else logging.INFO,
                "member " + event.new.value,
                name=rec.name if rec else None,
                id=event.node_id.hex(),
                was=event.old.value,
                incarnation=event.incarnation,
            )
        elif isinstance(event, Refuted):
            log.warning(
                "refuted a suspicion of this node",
                incarnation=event.incarnation,
                accused=event.accused,
            )
        elif isinstance(event, MemberRemoved):
            log.info("member forgotten", id=event.node_id.hex())
        elif isinstance(event, PathChanged):
            log.log(
                logging.WARNING if event.reason == "no answer" else logging.INFO,
                "gossip path " + event.path.value,
                name=_name_of(self.node, event.node_id),
                id=event.node_id.hex(),
                reason=event.reason,
            )
        elif isinstance(event, core.LeaveFinished):
            log.info("leave finished", acknowledged=event.acknowledged)
            if self._leave_done is not None and not self._leave_done.done():
                self._leave_done.set_result(event.acknowledged)
        if isinstance(event, core.MemberUpdated):
            self._zone_member(event.record.node_id)
        elif isinstance(event, MemberStateChanged | MemberJoined | MemberRemoved):
            self._zone_member(event.node_id)

    # ----------------------------------------------------------------- DNS

    async def _start_dns(self, config: DnsConfig) -> None:
        """Listen where configured; only explicitly given addresses must bind."""
        upstreams = config.upstreams if config.upstreams is not None else default_upstreams()
        self.dns = DnsServer(
            self.zone, upstreams=upstreams, forward=config.forward, timeout=config.timeout
        )
        await self.dns.start(
            listen_addresses(config, self.node.addresses()), strict=config.listen is not None
        )

    def _zone_state(self, nid: bytes) -> MemberState | None:
        if nid == self.node.sign.node_id:
            return MemberState.LEFT if self.node.left else MemberState.ALIVE
        st = self.node.member_state(nid)
        return st[0] if st is not None else None

    def _zone_member(self, nid: bytes) -> None:
        """One member's record or state changed: update its names at once."""
        rec = self.node.store.get(nid)
        changed = self.zone.set_leader(self.node.leader)
        if rec is None:
            changed |= self.zone.remove(nid)
        else:
            changed |= self.zone.update_record(rec, self._zone_state(nid))
        if changed:
            self._log_conflicts()

    def _zone_sync(self) -> None:
        if self.zone.sync(self.node.store, self._zone_state, self.node.leader):
            self._log_conflicts()

    def _log_conflicts(self) -> None:
        now = set(self.zone.conflicts())
        for c in sorted(now - self._conflicts, key=lambda c: (c.name, c.node_id, c.kind)):
            log.warning(
                "dns name conflict",
                name=c.name,
                kind=c.kind,
                member=_name_of(self.node, c.node_id) or c.node_id.hex(),
                reason=c.reason,
            )
        for c in sorted(self._conflicts - now, key=lambda c: (c.name, c.node_id, c.kind)):
            log.info("dns name conflict resolved", name=c.name, id=c.node_id.hex())
        self._conflicts = now

    def dns_view(self) -> dict[str, Any]:
        """``GET /v1/dns``: the zone as this node serves it, its conflicts, the server."""
        zone, server = self.zone, self.dns
        conflicts = []
        for c in zone.conflicts():
            item: dict[str, Any] = c.to_json()
            item["node_name"] = _name_of(self.node, c.node_id)
            item["winner_name"] = _name_of(self.node, c.winner) if c.winner else None
            conflicts.append(item)
        return {
            "zone": zone.zone,
            "reverse_zones": list(zone.reverse),
            "serial": zone.serial,
            "ttl": zone.ttl,
            "leader": f"leader.{zone.zone}",
            "records": zone.rows(),
            "conflicts": conflicts,
            "server": None
            if server is None
            else {
                "listen": [format_hostport(a) for a in server.bound],
                "forwarding": server.forwarding,
                "upstreams": [format_hostport(a) for a in server.upstreams],
                "stats": dict(sorted(server.stats.items())),
            },
        }

    # ----------------------------------------------------------------- run file

    def _load_http_token(self) -> str:
        """A bearer token for state-changing HTTP calls, readable only by root/the owner."""
        if self.datadir.has_key(HTTP_TOKEN_KEY):
            return self.datadir.read_key(HTTP_TOKEN_KEY).hex()
        raw = secrets.token_bytes(16)
        self.datadir.write_key(HTTP_TOKEN_KEY, raw)
        return raw.hex()

    @property
    def http_token(self) -> str:
        return self._http_token

    def _write_run_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "listen": format_hostport(self.listen_addr),
            "http": format_hostport(self.http_bound) if self.http_addr else None,
        }
        atomic_write(self.datadir.path / RUN_FILE, json.dumps(info).encode(), mode=0o644)

    # ----------------------------------------------------------------- views

    def status(self) -> dict[str, Any]:
        node = self.node
        v4, v6 = node.addresses()
        states = Counter(self.member_state(r.node_id) for r in node.store)
        return {
            "node_id": node.sign.node_id.hex(),
            "name": node.config.name,
            "hostname": node.config.hostname,
            "addresses": {"ipv4": v4, "ipv6": v6},
            "is_leader": node.is_leader,
            "leader_id": node.leader.hex(),
            "leader_name": _name_of(node, node.leader),
            "cluster_id": node_cluster_id(node),
            "zone": node.config.zone,
            "members": dict(sorted(states.items())),
            "member_count": len(node.store),
            "wireguard": (
                self.wg.describe() if self.wg else {"backend": "none", "interface": None}
            ),
            "listen": format_hostport(self.listen_addr),
            "endpoints": node.config.endpoints,
            "version": node.config.version,
            "uptime_s": round(self.clock() - self.metrics.started, 3),
            "gossip_paths": {
                **node.paths.describe(self.clock()),
                "overlay_listen": self.overlay_listen,
            },
            "gossip": {
                "incarnation": node.swim.incarnation,
                "local_health": node.swim.local_health,
                "probe_interval": node.swim.timing.probe_interval,
                "push_pull_interval": node.swim.timing.push_pull_interval,
            },
            "left": node.left,
        }

    def member_state(self, nid: bytes) -> str:
        """SWIM state; "unknown" for a record whose node is not in the SWIM view (it has
        no endpoint to probe)."""
        st = self.node.member_state(nid)
        return st[0].value if st is not None else "unknown"

    def members(self) -> list[dict[str, Any]]:
        node = self.node
        out = []
        for rec in node.store:
            v4, v6 = rec.addresses(node.plan)
            swim = node.swim.member(rec.node_id)
            out.append(
                {
                    "id": rec.node_id.hex(),
                    "name": rec.name,
                    "hostname": rec.hostname,
                    "state": swim.state.value if swim else "unknown",
                    "incarnation": swim.incarnation if swim else None,
                    "state_since": swim.since if swim else None,
                    "gossip_addr": format_hostport(swim.addr) if swim else None,
                    "record_seq": rec.seq,
                    "addresses": {"ipv4": str(v4), "ipv6": str(v6)},
                    "endpoints": list(rec.endpoints),
                    "wg_port": rec.wg_port,
                    **self._observed_fields(rec.node_id),
                    **(
                        self.wg.member_fields(rec)
                        if self.wg
                        else {"connection": None, "last_handshake": None}
                    ),
                    "wg_public_key": _b64(rec.wg_key),
                    "admitted_by": rec.admission.issuer.hex(),
                    "version": rec.version,
                    "is_leader": rec.node_id == node.leader,
                    "is_self": rec.node_id == node.sign.node_id,
                }
            )
        return out

    def _observed_fields(self, nid: bytes) -> dict[str, Any]:
        """What the core keeps about where a member's tunnel is seen from, and which path
        gossip to it takes. The observed endpoint is the first NAT-traversal candidate
        (server-reflexive, as WireGuard saw it)."""
        obs = self.node.observed_endpoint(nid)
        path = self.node.paths.path_of(nid)
        fields: dict[str, Any] = {
            "seen_from": None,
            "observed_endpoint": None,
            "nat_candidates": [],
            "gossip_path": path.value if path else None,
        }
        if obs is not None:
            observed = {
                "endpoint": obs.endpoint,
                "last_handshake": obs.last_handshake,
                "reported_at": obs.reported_at,
            }
            fields["seen_from"] = obs.endpoint
            fields["observed_endpoint"] = observed
            fields["nat_candidates"] = [{"kind": "observed", **observed}]
        return fields

    def leases(self) -> list[dict[str, Any]]:
        node = self.node
        out = []
        for lease in node.store.leases():
            v4, v6 = node.plan.block(lease.block)
            out.append(
                {
                    "block": lease.block,
                    "ipv4": str(v4),
                    "ipv6": str(v6),
                    "holder": lease.holder.hex() or None,
                    "holder_name": _name_of(node, lease.holder) if lease.holder else None,
                    "granted_by": lease.granted_by.hex(),
                    "granted_at": lease.granted_at,
                    "expiry": lease.expires,
                    "released": lease.released,
                }
            )
        return out


def node_cluster_id(node: Node) -> str:
    return cluster_id(node.ca_public).hex()


def _name_of(node: Node, nid: bytes) -> str | None:
    rec = node.store.get(nid)
    return rec.name if rec is not None else None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
