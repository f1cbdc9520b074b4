"""The debug endpoint of a real agent (INTERFACE.md): status codes, content types,
``/metrics`` in the Prometheus text format, HEAD, keep-alive, and the endpoint's own
counters. One ``meshd run`` on 127.0.0.1, tracked by PID (the ``cluster`` fixture)."""

from __future__ import annotations

import http.client
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshd.demo import LocalCluster

pytestmark = pytest.mark.integration

#: Every family /metrics had when it was rendered by prometheus_client (as exposed).
FAMILIES = {
    "meshd_rx_packets", "meshd_tx_packets", "meshd_rx_bytes", "meshd_tx_bytes",
    "meshd_send_errors", "meshd_state_writes", "meshd_joins_admitted",
    "meshd_gossip_path_fallbacks", "meshd_gossip_path_resent", "meshd_gossip_packets",
    "meshd_dropped_packets", "meshd_verify_cache_hits", "meshd_verify_cache_misses",
    "meshd_members", "meshd_gossip_dropped", "meshd_local_health", "meshd_incarnation",
    "meshd_is_leader", "meshd_dns_names", "meshd_dns_conflicts",
}  # fmt: skip


def test_endpoint_contract(cluster: LocalCluster) -> None:
    assert cluster.init("solo").returncode == 0
    cluster.start("solo")
    conn = http.client.HTTPConnection("127.0.0.1", cluster.http["solo"], timeout=10)
    try:
        for path in ("/healthz", "/v1/status", "/v1/members", "/v1/leases", "/v1/dns"):
            conn.request("GET", path)  # all on one kept-alive connection
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, path
            assert resp.getheader("Content-Type") == "application/json; charset=utf-8"
            assert isinstance(json.loads(body), dict)
        conn.request("HEAD", "/v1/status")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        assert int(resp.getheader("Content-Length") or 0) > 0
        conn.request("GET", "/nope")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (404, b"404: Not Found")
        conn.request("GET", "/v1/leave")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "POST"
        resp.read()
        conn.request("POST", "/v1/leave", body=b"")
        resp = conn.getresponse()
        assert resp.status == 401 and "bearer token" in json.loads(resp.read())["error"]
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    finally:
        conn.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families.keys() >= FAMILIES | {"meshd_http_responses", "meshd_http_dropped"}
    assert families["meshd_is_leader"].samples[0].value == 1
    answered = {s.labels["code"]: s.value for s in families["meshd_http_responses"].samples}
    # 6 here (not yet /metrics itself), and the start-up polls of /healthz.
    assert answered.pop("200") >= 6
    assert answered == {"401": 1, "404": 1, "405": 1}
