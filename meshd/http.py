"""The debug HTTP endpoint (aiohttp): JSON views of the agent, Prometheus metrics, leave.

Read-only paths need no auth (the endpoint binds to 127.0.0.1 by default);
``POST /v1/leave`` changes state and needs ``Authorization: Bearer <token>``, the
token being the hex of the 0600 key file ``http.key`` in the data dir, so only
someone who can read the data dir can drive the agent.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshd.core.records import normalize_hostname
from meshd.core.wire import Addr

if TYPE_CHECKING:
    from meshd.agent import Agent

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")


def build_app(agent: Agent) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[AGENT_KEY] = agent
    registry = CollectorRegistry()
    registry.register(_AgentCollector(agent))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def status(request: web.Request) -> web.Response:
        return web.json_response(agent.status())

    async def members(request: web.Request) -> web.Response:
        return web.json_response({"members": agent.members()})

    async def leases(request: web.Request) -> web.Response:
        return web.json_response({"leases": agent.leases()})

    async def dns(request: web.Request) -> web.Response:
        return web.json_response(agent.dns_view())

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    def unauthorised(request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        expected = f"Bearer {agent.http_token}"
        if hmac.compare_digest(auth.encode(), expected.encode()):
            return None
        return web.json_response(
            {"error": "missing or wrong bearer token (see http.key in the data dir)"},
            status=401,
        )

    async def leave(request: web.Request) -> web.Response:
        if (refused := unauthorised(request)) is not None:
            return refused
        try:
            acknowledged = await agent.leave()
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response({"left": True, "acknowledged": acknowledged})

    async def record(request: web.Request) -> web.Response:
        """Change this node's extra DNS name; the new record spreads by gossip."""
        if (refused := unauthorised(request)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        host = body.get("hostname") if isinstance(body, dict) else None
        try:
            if not isinstance(body, dict) or set(body) != {"hostname"}:
                raise ValueError('expected {"hostname": NAME or null}')
            if host is not None:
                host = normalize_hostname(host) if isinstance(host, str) else None
                if host is None:
                    raise ValueError("hostname must be a string or null")
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        seq = agent.set_hostname(host)
        return web.json_response({"hostname": host, "record_seq": seq})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/members", members)
    app.router.add_get("/v1/leases", leases)
    app.router.add_get("/v1/dns", dns)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/leave", leave)
    app.router.add_post("/v1/record", record)
    return app


async def start_http(agent: Agent, addr: Addr) -> tuple[web.AppRunner, Addr]:
    """Serve the app on ``addr``; return the runner and the address actually bound."""
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, addr[0], addr[1], reuse_address=True)
    await site.start()
    bound = runner.addresses[0] if runner.addresses else addr
    return runner, (bound[0], bound[1])


class _AgentCollector(Collector):
    """Reads the agent's counters at scrape time; nothing to keep in sync."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        a = self.agent
        m = a.metrics
        for name, doc, value in (
            ("meshd_rx_packets", "Gossip datagrams received (both paths)", m.rx_packets),
            ("meshd_tx_packets", "Gossip datagrams sent (both paths)", m.tx_packets),
            ("meshd_rx_bytes", "Gossip bytes received (both paths)", m.rx_bytes),
            ("meshd_tx_bytes", "Gossip bytes sent (both paths)", m.tx_bytes),
            ("meshd_send_errors", "Datagrams the socket refused", m.send_errors),
            ("meshd_state_writes", "Atomic writes of state.json", m.state_writes),
            ("meshd_joins_admitted", "Join requests this node admitted", a.node.admitted),
            (
                "meshd_gossip_path_fallbacks",
                "Tunnels whose gossip fell back to the bootstrap channel (probe unanswered)",
                a.node.paths.stats.fallbacks,
            ),
            (
                "meshd_gossip_path_resent",
                "Probes re-sent over the bootstrap channel after a fallback",
                a.node.paths.stats.resent,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        paths = CounterMetricFamily(
            "meshd_gossip_packets",
            "Gossip datagrams by direction (rx, tx) and path (overlay, underlay)",
            labels=["direction", "path"],
        )
        for direction, counts in (("rx", a.node.paths.stats.rx), ("tx", a.node.paths.stats.tx)):
            for path in ("overlay", "underlay"):
                paths.add_metric([direction, path], counts[path])
        yield paths
        drops = CounterMetricFamily(
            "meshd_dropped_packets", "Inbound datagrams dropped, by reason", labels=["reason"]
        )
        for reason, count in sorted(a.node.drops.items(), key=lambda kv: kv[0].value):
            drops.add_metric([reason.value], count)
        yield drops
        cache = a.node.store.cache
        yield CounterMetricFamily(
            "meshd_verify_cache_hits", "Signature checks answered from cache", value=cache.hits
        )
        yield CounterMetricFamily(
            "meshd_verify_cache_misses", "Signature checks computed", value=cache.misses
        )
        members = GaugeMetricFamily(
            "meshd_members", "Members in this node's view, by SWIM state", labels=["state"]
        )
        for state, count in sorted(a.status()["members"].items()):
            members.add_metric([state], count)
        yield members
        swim_drops = CounterMetricFamily(
            "meshd_gossip_dropped",
            "Membership messages or items dropped, by reason",
            labels=["reason"],
        )
        for swim_reason, count in sorted(a.node.swim.drops.items()):
            swim_drops.add_metric([swim_reason], count)
        yield swim_drops
        yield GaugeMetricFamily(
            "meshd_local_health", "Lifeguard local health (0 is healthy)", a.node.swim.local_health
        )
        yield GaugeMetricFamily(
            "meshd_incarnation", "This node's SWIM incarnation", a.node.swim.incarnation
        )
        yield GaugeMetricFamily(
            "meshd_is_leader", "1 if this node holds the cluster CA", int(a.node.is_leader)
        )
        yield GaugeMetricFamily("meshd_dns_names", "Names with records in the zone", len(a.zone))
        yield GaugeMetricFamily(
            "meshd_dns_conflicts", "Name claims that lost or were refused", len(a.zone.conflicts())
        )
        if a.dns is not None:
            dns = CounterMetricFamily(
                "meshd_dns_events",
                "DNS server counters: queries, responses by rcode, drops, forwards, cache hits",
                labels=["event"],
            )
            for event, count in sorted(a.dns.stats.items()):
                dns.add_metric([event], count)
            yield dns
