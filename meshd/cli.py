"""The ``meshd`` command (INTERFACE.md). Options resolve flag > MESHD_* env > TOML file > default.

Every failure is one sentence on stderr naming what was wrong, exit code 1, and a
data directory left as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from meshd import __version__, persist
from meshd.agent import RUN_FILE, Agent, drive_join, node_cluster_id, parse_hostport
from meshd.core.admission import TokenError, mint_token
from meshd.core.crypto import SigningKey, WireGuardKey
from meshd.core.ipam import AddressPlan, IpamError
from meshd.core.join import JoinClient, JoinFailed
from meshd.core.membership import PROFILES, Timing
from meshd.core.node import Node, NodeConfig
from meshd.core.records import is_dns_label, normalize_hostname
from meshd.core.wire import Keyring, format_hostport
from meshd.dns import DEFAULT_PORT, DnsConfig
from meshd.state import DataDir, StateError

DEFAULTS: dict[str, Any] = {
    "cidr": "10.200.0.0/16",
    "cidr6": "fd00:200::/48",
    "listen": "0.0.0.0:7946",
    "advertise": None,
    "wg_port": 51820,
    "interface": "mesh0",
    "zone": "mesh.internal.",
    "name": None,
    "hostname": None,
    "seed": None,
    "token": None,
    "timeout": "30s",
    "wg_backend": "auto",
    "mtu": 1420,
    "profile": "lan",
    "http": "127.0.0.1:7947",
    "dns": None,
    "dns_upstream": None,
    "ttl": "24h",
    "uses": 1,
    "nodes": 5,
    "duration": None,
    "log_format": "console",
    "log_level": "info",
}


class CliError(Exception):
    """A user-facing failure: the message is printed as is."""


def default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/meshd"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "meshd")


# ----------------------------------------------------------------------- options


class Options:
    """Resolves each option: flag, then MESHD_<NAME>, then the config file, then the default."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.file: dict[str, Any] = {}
        path = args.config or os.environ.get("MESHD_CONFIG")
        if path:
            import tomllib  # only with a config file: not every agent pays for it

            try:
                with open(path, "rb") as fh:
                    self.file = {k.replace("-", "_"): v for k, v in tomllib.load(fh).items()}
            except OSError as exc:
                raise CliError(f"cannot read config file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise CliError(f"config file {path} is not valid TOML: {exc}") from None

    def get(self, name: str) -> Any:
        value = getattr(self.args, name, None)
        if value is not None:
            return value
        env = os.environ.get("MESHD_" + name.upper())
        if env is not None and env != "":
            return env
        if name in self.file:
            return self.file[name]
        return DEFAULTS.get(name)

    def given(self, name: str) -> bool:
        """True if the operator set the option anywhere (not just the default)."""
        return (
            getattr(self.args, name, None) is not None
            or bool(os.environ.get("MESHD_" + name.upper()))
            or name in self.file
        )

    def int(self, name: str, lo: int, hi: int) -> int:
        value = self.get(name)
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise CliError(f"--{name.replace('_', '-')} must be a number, got {value!r}") from None
        if not lo <= number <= hi:
            raise CliError(f"--{name.replace('_', '-')} must be between {lo} and {hi}")
        return number

    def datadir(self) -> DataDir:
        return DataDir(self.get("data_dir") or default_data_dir())


def parse_duration(text: str | int | float) -> float:
    """``90``, ``90s``, ``500ms``, ``30m``, ``24h``, ``7d``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smhd]?)\s*", str(text))
    if not m:
        raise CliError(f"{text!r} is not a duration (use e.g. 500ms, 90s, 30m, 24h, 7d)")
    unit = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return float(m.group(1)) * unit


def resolve_timing(opts: Options) -> Timing:
    """The ``--profile`` (lan, wan, local), then every ``[timing]`` key of the config file,
    then ``MESHD_TIMING`` (``name=value,...``), then each ``--timing name=value``."""
    profile = str(opts.get("profile"))
    if profile not in PROFILES:
        raise CliError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    pairs: list[tuple[str, Any]] = []
    table = opts.file.get("timing", {})
    if not isinstance(table, dict):
        raise CliError("the [timing] section of the config file must be a table")
    pairs.extend(table.items())
    env = os.environ.get("MESHD_TIMING", "")
    items = [x for x in env.split(",") if x.strip()] + list(
        getattr(opts.args, "timing", None) or []
    )
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--timing takes NAME=VALUE, got {item!r}")
        pairs.append((name.strip(), value.strip()))
    fields = {f.name: f for f in dataclasses.fields(Timing)}
    changes: dict[str, Any] = {}
    for name, value in pairs:
        name = name.replace("-", "_")
        f = fields.get(name)
        if f is None:
            raise CliError(f"unknown timing {name!r}; known: {', '.join(fields)}")
        changes[name] = _timing_value(name, str(f.type), value)
    try:
        return dataclasses.replace(PROFILES[profile], **changes)
    except ValueError as exc:
        raise CliError(f"bad timing: {exc}") from None


def _timing_value(name: str, typ: str, value: Any) -> Any:
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "on", "1", "yes"):
            return True
        if str(value).lower() in ("false", "off", "0", "no"):
            return False
        raise CliError(f"timing {name} must be true or false, got {value!r}")
    if typ == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise CliError(f"timing {name} must be a whole number, got {value!r}") from None
    if name.endswith("_mult"):
        return _float(name, value)
    return parse_duration(value)  # every other float timing is a duration


def _float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CliError(f"timing {name} must be a number, got {value!r}") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data directory (default /var/lib/meshd as root)")
    p.add_argument("--config", help="TOML config file (keys as the long options)")
    p.add_argument("--log-format", choices=["console", "json"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _add_node_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cidr", help="overlay IPv4 CIDR (default 10.200.0.0/16)")
    p.add_argument("--cidr6", help="overlay IPv6 CIDR (default fd00:200::/48)")
    p.add_argument("--listen", help="gossip/bootstrap UDP ADDR:PORT (default 0.0.0.0:7946)")
    p.add_argument("--advertise", help="ADDR:PORT other members use to reach this node")
    p.add_argument("--wg-port", help="WireGuard listen port (default 51820)")
    p.add_argument("--interface", help="WireGuard interface name (default mesh0)")
    p.add_argument("--zone", help="DNS zone (default mesh.internal.)")
    p.add_argument("--name", help="node name, a DNS label (default: the host name)")
    p.add_argument("--hostname", help="extra DNS name for this node")


def _add_join_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", help="ADDR:PORT[,ADDR:PORT...] of any existing members")
    p.add_argument("--token", help="join token from `meshd token`")
    p.add_argument("--timeout", help="give up joining after this long (default 30s)")


def _add_run_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wg-backend",
        choices=["auto", "kernel", "userspace", "memory", "none"],
        help="auto (default): the kernel module if present, else wireguard-go; memory: no "
        "interface (tests); none: gossip only",
    )
    p.add_argument("--mtu", help="WireGuard interface MTU (default 1420)")
    p.add_argument("--http", help="debug HTTP endpoint ADDR:PORT (default 127.0.0.1:7947)")
    p.add_argument(
        "--dns",
        help="DNS server ADDR:PORT[,ADDR:PORT...], or PORT for 127.0.0.1 and the overlay "
        "addresses (default 15353), or off",
    )
    p.add_argument(
        "--dns-upstream",
        help="resolvers for names outside the zone, ADDR[:PORT][,...] "
        "(default: the non-loopback nameservers of /etc/resolv.conf), or off",
    )
    p.add_argument(
        "--profile", choices=sorted(PROFILES), help="gossip timers: lan (default), wan, local"
    )
    p.add_argument(
        "--timing",
        action="append",
        metavar="NAME=VALUE",
        help="override one gossip timer, e.g. probe_interval=500ms (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshd", description="gossip-based WireGuard mesh agent")
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a new cluster with this node as leader")
    _add_common(p)
    _add_node_opts(p)

    p = sub.add_parser("token", help="print a join token")
    _add_common(p)
    p.add_argument("--ttl", help="validity, e.g. 30m, 24h (default 24h)")
    p.add_argument("--uses", help="how many nodes may join with it; 0 = unlimited (default 1)")

    p = sub.add_parser("join", help="join an existing cluster")
    _add_common(p)
    _add_node_opts(p)
    _add_join_opts(p)

    p = sub.add_parser("run", help="run the agent in the foreground")
    _add_common(p)
    _add_run_opts(p)

    p = sub.add_parser("up", help="init or join when new, then run")
    _add_common(p)
    _add_node_opts(p)
    _add_join_opts(p)
    _add_run_opts(p)

    for name, text in (("status", "this node's summary"), ("peers", "one row per member")):
        p = sub.add_parser(name, help=text)
        _add_common(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--http", help="agent endpoint (default: from the running agent)")

    p = sub.add_parser("leave", help="leave the cluster gracefully and stop the agent")
    _add_common(p)
    p.add_argument("--http", help="agent endpoint (default: from the running agent)")

    p = sub.add_parser("demo", help="start a local mesh on this machine and show it working")
    p.add_argument("--nodes", help="how many nodes, 2 to 50 (default 5)")
    p.add_argument("--duration", help="stop after this long (default: until Ctrl-C)")
    p.add_argument(
        "--loopback",
        action="store_true",
        help="agents on 127.0.0.1 with the memory WireGuard backend, even as root "
        "(the default without root); as root the default is network namespaces "
        "with real WireGuard tunnels",
    )
    p.add_argument("--config", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------- logging


def setup_logging(opts: Options) -> None:
    level = getattr(logging, str(opts.get("log_level")).upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if opts.get("log_format") == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


# ----------------------------------------------------------------- node options


def _node_settings(opts: Options) -> dict[str, Any]:
    listen = _hostport(opts, "listen")
    advertise = opts.get("advertise")
    if advertise:
        adv = parse_advertise(str(advertise), listen[1])
    else:
        adv = (_primary_address() if listen[0] in ("0.0.0.0", "::") else listen[0], listen[1])
    name = str(opts.get("name") or socket.gethostname().split(".")[0]).lower()
    if not is_dns_label(name):
        raise CliError(f"node name {name!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
    hostname = opts.get("hostname")
    if hostname is not None:
        try:
            hostname = normalize_hostname(str(hostname))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    zone = str(opts.get("zone"))
    if not zone.endswith("."):
        zone += "."
    return {
        "listen": format_hostport(listen),
        "advertise": format_hostport(adv),
        "wg_port": opts.int("wg_port", 1, 65535),
        "interface": _interface(str(opts.get("interface"))),
        "name": name,
        "hostname": hostname,
        "zone": zone,
    }


def parse_advertise(text: str, default_port: int) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text, default_port)
    except ValueError as exc:
        raise CliError(f"--advertise: {exc}") from None
    if host in ("0.0.0.0", "::", ""):
        raise CliError("--advertise must be an address other members can reach, not a wildcard")
    return host, port


def _hostport(opts: Options, name: str) -> tuple[str, int]:
    try:
        return parse_hostport(str(opts.get(name)))
    except ValueError as exc:
        raise CliError(f"--{name}: {exc}") from None


def _interface(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
        raise CliError(f"interface name {name!r} is invalid (1-15 letters, digits, '-_.')")
    return name


def _primary_address() -> str:
    """The source address the kernel would use for outbound traffic (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # connect() on UDP only picks a route
        return str(s.getsockname()[0])
    return "127.0.0.1"


def _refuse_initialised(datadir: DataDir) -> None:
    if datadir.is_initialised():
        raise CliError(
            f"data directory {datadir.path} is already initialised; "
            "use `meshd run`, or pick another --data-dir"
        )


# ---------------------------------------------------------------------- commands


def cmd_init(opts: Options) -> Node:
    datadir = opts.datadir()
    _refuse_initialised(datadir)
    settings = _node_settings(opts)
    try:
        plan = AddressPlan.parse(
            str(opts.get("cidr")), str(opts.get("cidr6")), avoid=[settings["advertise"]]
        )
    except IpamError as exc:
        raise CliError(str(exc)) from None
    now = time.time()
    node = Node.create_cluster(
        sign=SigningKey(os.urandom(32)),
        wg=WireGuardKey(os.urandom(32)),
        ca=SigningKey(os.urandom(32)),
        keyring=Keyring([os.urandom(32)]),
        token_key=os.urandom(32),
        plan=plan,
        config=_node_config(settings),
        now=now,
        random_bytes=os.urandom,
    )
    persist.save_new(datadir, node, settings)
    _print_identity(node, "initialised a new cluster")
    return node


def _node_config(settings: dict[str, Any]) -> NodeConfig:
    return NodeConfig(
        name=settings["name"],
        hostname=settings["hostname"],
        endpoints=[settings["advertise"]],
        zone=settings["zone"],
        version=__version__,
        wg_port=int(settings["wg_port"]),
    )


def _print_identity(node: Node, what: str) -> None:
    v4, v6 = node.addresses()
    print(f"{what} (cluster {node_cluster_id(node)})")
    print(f"name  {node.config.name}")
    print(f"id    {node.sign.node_id.hex()}")
    print(f"ipv4  {v4}")
    print(f"ipv6  {v6}")
    sys.stdout.flush()


def _load_member(
    opts: Options, timing: Timing | None = None
) -> tuple[DataDir, Node, dict[str, Any]]:
    """The node in the data dir, refusing a missing, corrupt or departed one."""
    datadir = opts.datadir()
    try:
        node, settings = persist.load(datadir, time.time(), timing)
    except StateError as exc:
        raise CliError(str(exc)) from None
    if node.left:
        raise CliError(
            f"this node left the cluster; remove {datadir.path} and join again with a new token"
        )
    return datadir, node, settings


def cmd_token(opts: Options) -> None:
    _, node, _ = _load_member(opts)
    uses = opts.int("uses", 0, 1_000_000)
    try:
        token, _ = mint_token(
            node.token_key,
            node.sign.node_id,
            node.ca_public,
            os.urandom(8),
            time.time(),
            parse_duration(opts.get("ttl")),
            uses,
        )
    except TokenError as exc:
        raise CliError(str(exc)) from None
    print(token)


def _seeds(opts: Options) -> list[tuple[str, int]]:
    text = opts.get("seed")
    if not text:
        raise CliError("--seed is required to join (ADDR:PORT of any member)")
    seeds = []
    for item in str(text).split(","):
        try:
            host, port = parse_hostport(item, 7946)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except ValueError as exc:
            raise CliError(f"--seed: {exc}") from None
        except socket.gaierror as exc:
            raise CliError(f"--seed: cannot resolve {item.strip()!r}: {exc.strerror}") from None
        addr = infos[0][4]
        seeds.append((str(addr[0]), int(addr[1])))
    return seeds


def cmd_join(opts: Options) -> Node:
    datadir = opts.datadir()
    _refuse_initialised(datadir)
    settings = _node_settings(opts)
    token = opts.get("token")
    if not token:
        raise CliError("--token is required to join (mint one with `meshd token` on a member)")
    seeds = _seeds(opts)
    timeout = parse_duration(opts.get("timeout"))
    sign, wg = SigningKey(os.urandom(32)), WireGuardKey(os.urandom(32))
    try:
        client = JoinClient(
            token=str(token),
            seeds=seeds,
            sign=sign,
            wg_key=wg.public,
            reply_key=WireGuardKey(os.urandom(32)),
            request_id=os.urandom(16),
            name=settings["name"],
            hostname=settings["hostname"],
            endpoints=[settings["advertise"]],
            now=time.time(),
            timeout=timeout,
        )
    except TokenError as exc:
        raise CliError(str(exc)) from None
    event = asyncio.run(drive_join(client))
    if isinstance(event, JoinFailed):
        raise CliError(event.reason)
    grant = event.grant
    for name, given in (("cidr", grant.plan.cidr4), ("cidr6", grant.plan.cidr6)):
        if opts.given(name) and str(opts.get(name)) != str(given):
            raise CliError(f"--{name} {opts.get(name)} differs from the cluster's {given}")
    settings["zone"] = grant.zone
    node = Node.from_grant(
        grant,
        sign=sign,
        wg=wg,
        config=_node_config(settings),
        now=time.time(),
        random_bytes=os.urandom,
    )
    persist.save_new(datadir, node, settings)
    _print_identity(node, f"joined through {format_hostport(event.seed_addr)}")
    return node


def cmd_run(opts: Options) -> None:
    backend = str(opts.get("wg_backend"))
    mtu = opts.int("mtu", 1280, 65535)
    timing = resolve_timing(opts)
    datadir, node, settings = _load_member(opts, timing)
    http = None if str(opts.get("http")).lower() == "off" else _hostport(opts, "http")
    dns = dns_config(opts.get("dns"), opts.get("dns_upstream"))
    asyncio.run(_run_agent(datadir, node, settings, http, dns, wg=(backend, mtu)))


async def _dataplane(node: Node, settings: dict[str, Any], backend: str, mtu: int) -> Any:
    """The WireGuard data plane for ``--wg-backend`` (None for none)."""
    from meshd.wg import WireGuardError, select_backend
    from meshd.wg.dataplane import DataPlane

    interface = str(settings.get("interface") or DEFAULTS["interface"])
    try:
        be = await select_backend(backend, interface)
    except WireGuardError as exc:
        raise CliError(str(exc)) from None
    if be is None:
        return None
    port = int(settings.get("wg_port") or DEFAULTS["wg_port"])
    return DataPlane(be, node, wg_port=port, mtu=mtu, lock=be.kind != "memory")


_OFF = ("off", "none", "false", "no", "0")


def dns_config(listen: Any, upstream: Any) -> DnsConfig | None:
    """``--dns`` and ``--dns-upstream`` as a DnsConfig (None: no DNS server)."""
    text = "" if listen is None else str(listen).strip()
    if text.lower() in _OFF:
        return None
    addrs: tuple[tuple[str, int], ...] | None = None
    port = DEFAULT_PORT
    if text:
        if re.fullmatch(r":?\d+", text):
            port = _port(text.lstrip(":"), "--dns")
        else:
            items = []
            for item in text.split(","):
                try:
                    host, p = parse_hostport(item.strip(), DEFAULT_PORT)
                    ipaddress.ip_address(host)
                except ValueError as exc:
                    raise CliError(f"--dns: {item.strip()!r} is not ADDR:PORT ({exc})") from None
                items.append((host, p))
            addrs = tuple(items)
    forward, upstreams = True, None
    up = "" if upstream is None else str(upstream).strip()
    if up.lower() in _OFF:
        forward = False
    elif up:
        items = []
        for item in up.split(","):
            try:
                host, p = parse_hostport(item.strip(), 53)
                ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError as exc:
                raise CliError(
                    f"--dns-upstream: {item.strip()!r} is not an IP address[:PORT] ({exc})"
                ) from None
            items.append((host, p))
        upstreams = tuple(items)
    return DnsConfig(listen=addrs, port=port, upstreams=upstreams, forward=forward)


def _port(text: str, option: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise CliError(f"{option}: port {port} is out of range (1-65535)")
    return port


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel once the agent has started.

    Start-up (imports, key loading, the first views) frees malloc chunks inside
    glibc's heap that glibc keeps resident: only ``malloc_trim`` returns such holes.
    Measured on one idle agent: 0.6 MiB less RSS, ``ctypes`` included; one call
    takes under 0.1 ms. Repeating it every minute gained nothing measurable in a
    10-agent cluster, so it runs once. A no-op where the C library has no
    ``malloc_trim`` (musl).
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


async def _run_agent(
    datadir: DataDir,
    node: Node,
    settings: dict[str, Any],
    http: tuple[str, int] | None,
    dns: DnsConfig | None = None,
    wg: tuple[str, int] = ("none", 1420),
) -> None:
    from meshd.wg import WireGuardError

    dataplane = await _dataplane(node, settings, *wg)
    agent = Agent(datadir, node, settings, http=http, dns=dns, wg=dataplane)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before start: a stop mid-start is clean
        loop.add_signal_handler(sig, agent.stopped.set)
    try:
        await agent.start()
    except OSError as exc:
        raise CliError(f"cannot start the agent: {exc.strerror or exc}") from None
    except WireGuardError as exc:
        raise CliError(f"cannot set up WireGuard: {exc}") from None
    release_free_heap()
    try:
        await agent.stopped.wait()
    finally:
        await agent.stop()


def cmd_up(opts: Options) -> None:
    datadir = opts.datadir()
    if not datadir.is_initialised():
        if opts.get("seed"):
            cmd_join(opts)
        else:
            cmd_init(opts)
    cmd_run(opts)


def _agent_url(opts: Options, path: str) -> str:
    http = getattr(opts.args, "http", None) or os.environ.get("MESHD_HTTP")
    if not http:
        run_file = opts.datadir().path / RUN_FILE
        try:
            http = json.loads(run_file.read_text()).get("http")
        except (OSError, ValueError):
            http = None
    if not http:
        http = DEFAULTS["http"]
    return f"http://{http}{path}"


def _get_json(opts: Options, path: str) -> Any:
    import urllib.error  # here, not at the top: the agent never needs urllib.request
    import urllib.request

    url = _agent_url(opts, path)
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(
            f"cannot reach the agent at {url}: is `meshd run` running? ({exc})"
        ) from None
    except ValueError:
        raise CliError(f"the agent at {url} did not answer with JSON") from None


def cmd_status(opts: Options) -> None:
    st = _get_json(opts, "/v1/status")
    if opts.args.json:
        print(json.dumps(st, indent=2))
        return
    counts = ", ".join(f"{n} {s}" for s, n in st["members"].items()) or "none"
    leader = st.get("leader_name") or st["leader_id"][:12]
    rows = [
        ("node", f"{st['name']} ({st['node_id'][:12]})"),
        ("ipv4", st["addresses"]["ipv4"]),
        ("ipv6", st["addresses"]["ipv6"]),
        ("leader", "this node" if st["is_leader"] else leader),
        ("cluster", st["cluster_id"]),
        ("members", f"{st['member_count']} ({counts})"),
        ("wireguard", st["wireguard"]["backend"]),
        ("listen", st["listen"]),
        ("version", st["version"]),
        ("uptime", f"{st['uptime_s']:.0f}s"),
    ]
    for key, value in rows:
        print(f"{key:<10} {value}")


def cmd_peers(opts: Options) -> None:
    members = _get_json(opts, "/v1/members")["members"]
    if opts.args.json:
        print(json.dumps(members, indent=2))
        return
    print(_peers_table(members))


def _ago(when: Any) -> str:
    """A wall-clock timestamp as "12s ago" ("-" for none)."""
    if not isinstance(when, int | float) or isinstance(when, bool) or when <= 0:
        return "-"
    secs = max(0, int(time.time() - when))
    if secs < 120:
        return f"{secs}s ago"
    return f"{secs // 60}m ago" if secs < 7200 else f"{secs // 3600}h ago"


def _peers_table(members: Sequence[dict[str, Any]]) -> str:
    header = ("NAME", "IPV4", "IPV6", "STATE", "CONNECTION", "ENDPOINT", "HANDSHAKE", "GOSSIP")
    rows = [header]
    for m in members:
        name = m["name"] + (" *" if m.get("is_self") else "")
        rows.append(
            (
                name,
                m["addresses"]["ipv4"],
                m["addresses"]["ipv6"],
                m["state"],
                m.get("connection") or "-",
                m.get("wg_endpoint") or (m["endpoints"] or ["-"])[0],
                _ago(m.get("last_handshake")),
                m.get("gossip_path") or "-",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_leave(opts: Options) -> None:
    import urllib.error  # as in _get_json
    import urllib.request

    datadir = opts.datadir()
    try:
        token = datadir.read_key("http").hex()
    except StateError as exc:
        raise CliError(f"cannot authenticate to the agent: {exc}") from None
    url = _agent_url(opts, "/v1/leave")
    req = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            msg = exc.reason
        raise CliError(f"the agent refused to leave: {msg}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach the agent at {url}: {exc}") from None
    print("left the cluster" + ("" if body.get("acknowledged") else " (not all releases acked)"))


def cmd_demo(opts: Options) -> None:
    from meshd.demo import run_demo

    nodes = opts.int("nodes", 2, 50)
    duration = opts.get("duration")
    try:
        run_demo(nodes, parse_duration(duration) if duration else None, loopback=opts.args.loopback)
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
        raise CliError(f"demo failed: {exc}") from None


COMMANDS = {
    "init": cmd_init,
    "token": cmd_token,
    "join": cmd_join,
    "run": cmd_run,
    "up": cmd_up,
    "status": cmd_status,
    "peers": cmd_peers,
    "leave": cmd_leave,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = Options(args)
        setup_logging(opts)
        COMMANDS[args.command](opts)
    except CliError as exc:
        print(f"meshd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
