"""The debug HTTP endpoint: JSON views of the agent, Prometheus metrics, leave.

Served by :class:`meshd.httpserver.HttpServer` (h11 on asyncio streams). Read-only
paths need no auth (the endpoint binds to 127.0.0.1 by default); ``POST /v1/leave``
and ``POST /v1/record`` change state and need ``Authorization: Bearer <token>``, the
token being the hex of the 0600 key file ``http.key`` in the data dir, so only someone
who can read the data dir can drive the agent.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING

from meshd.core.records import normalize_hostname
from meshd.core.wire import Addr
from meshd.httpserver import Handler, HttpServer, Request, Response, json_response
from meshd.metrics import CONTENT_TYPE, counter, family, gauge, labelled

if TYPE_CHECKING:
    from meshd.agent import Agent


def routes(agent: Agent, server: HttpServer) -> Mapping[str, Mapping[str, Handler]]:
    """The endpoint's routes (INTERFACE.md); ``server`` is there for its own counters."""

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def status(request: Request) -> Response:
        return json_response(agent.status())

    async def members(request: Request) -> Response:
        return json_response({"members": agent.members()})

    async def leases(request: Request) -> Response:
        return json_response({"leases": agent.leases()})

    async def dns(request: Request) -> Response:
        return json_response(agent.dns_view())

    async def metrics(request: Request) -> Response:
        return Response(200, render_metrics(agent, server), CONTENT_TYPE)

    def unauthorised(request: Request) -> Response | None:
        auth = request.headers.get("authorization", "")
        expected = f"Bearer {agent.http_token}"
        if hmac.compare_digest(auth.encode(), expected.encode()):
            return None
        return json_response(
            {"error": "missing or wrong bearer token (see http.key in the data dir)"},
            status=401,
        )

    async def leave(request: Request) -> Response:
        if (refused := unauthorised(request)) is not None:
            return refused
        try:
            acknowledged = await agent.leave()
        except ValueError as exc:
            return json_response({"error": str(exc)}, status=409)
        return json_response({"left": True, "acknowledged": acknowledged})

    async def record(request: Request) -> Response:
        """Change this node's extra DNS name; the new record spreads by gossip."""
        if (refused := unauthorised(request)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return json_response({"error": "the body must be JSON"}, status=400)
        host = body.get("hostname") if isinstance(body, dict) else None
        try:
            if not isinstance(body, dict) or set(body) != {"hostname"}:
                raise ValueError('expected {"hostname": NAME or null}')
            if host is not None:
                host = normalize_hostname(host) if isinstance(host, str) else None
                if host is None:
                    raise ValueError("hostname must be a string or null")
        except ValueError as exc:
            return json_response({"error": str(exc)}, status=400)
        seq = agent.set_hostname(host)
        return json_response({"hostname": host, "record_seq": seq})

    return {
        "/healthz": {"GET": healthz},
        "/v1/status": {"GET": status},
        "/v1/members": {"GET": members},
        "/v1/leases": {"GET": leases},
        "/v1/dns": {"GET": dns},
        "/metrics": {"GET": metrics},
        "/v1/leave": {"POST": leave},
        "/v1/record": {"POST": record},
    }


async def start_http(agent: Agent, addr: Addr) -> tuple[HttpServer, Addr]:
    """Serve the endpoint on ``addr``; return the server and the address actually bound."""
    server = HttpServer({})
    server.routes = routes(agent, server)
    return server, await server.start(addr[0], addr[1])


def render_metrics(agent: Agent, server: HttpServer) -> bytes:
    """``GET /metrics``: the agent's counters, read at scrape time (nothing to keep in sync)."""
    a = agent
    m = a.metrics
    out = [
        counter(name, doc, value)
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
        )
    ]
    stats = a.node.paths.stats
    out.append(
        family(
            "meshd_gossip_packets",
            "Gossip datagrams by direction (rx, tx) and path (overlay, underlay)",
            "counter",
            (
                ({"direction": direction, "path": path}, counts[path])
                for direction, counts in (("rx", stats.rx), ("tx", stats.tx))
                for path in ("overlay", "underlay")
            ),
        )
    )
    drops = sorted(a.node.drops.items(), key=lambda kv: kv[0].value)
    out.append(
        labelled(
            "meshd_dropped_packets",
            "Inbound datagrams dropped, by reason",
            "counter",
            "reason",
            ((reason.value, count) for reason, count in drops),
        )
    )
    cache = a.node.store.cache
    out.append(
        counter("meshd_verify_cache_hits", "Signature checks answered from cache", cache.hits)
    )
    out.append(counter("meshd_verify_cache_misses", "Signature checks computed", cache.misses))
    out.append(
        labelled(
            "meshd_members",
            "Members in this node's view, by SWIM state",
            "gauge",
            "state",
            sorted(a.status()["members"].items()),
        )
    )
    out.append(
        labelled(
            "meshd_gossip_dropped",
            "Membership messages or items dropped, by reason",
            "counter",
            "reason",
            sorted(a.node.swim.drops.items()),
        )
    )
    swim = a.node.swim
    out.append(
        gauge("meshd_local_health", "Lifeguard local health (0 is healthy)", swim.local_health)
    )
    out.append(gauge("meshd_incarnation", "This node's SWIM incarnation", swim.incarnation))
    out.append(
        gauge("meshd_is_leader", "1 if this node holds the cluster CA", int(a.node.is_leader))
    )
    out.append(gauge("meshd_dns_names", "Names with records in the zone", len(a.zone)))
    out.append(
        gauge(
            "meshd_dns_conflicts", "Name claims that lost or were refused", len(a.zone.conflicts())
        )
    )
    if a.dns is not None:
        out.append(
            labelled(
                "meshd_dns_events",
                "DNS server counters: queries, responses by rcode, drops, forwards, cache hits",
                "counter",
                "event",
                sorted(a.dns.stats.items()),
            )
        )
    out.append(
        labelled(
            "meshd_http_responses",
            "Debug endpoint responses, by status code",
            "counter",
            "code",
            ((str(code), count) for code, count in sorted(server.responses.items())),
        )
    )
    out.append(
        labelled(
            "meshd_http_dropped",
            "Debug endpoint connections closed without a response, by reason",
            "counter",
            "reason",
            sorted(server.dropped.items()),
        )
    )
    return "".join(out).encode()
