"""The debug endpoint's HTTP server (meshd/httpserver.py) on 127.0.0.1, in-process.

Every test starts a server on an ephemeral loopback port with toy routes and talks
raw HTTP/1.1 to it over asyncio streams, so what is checked is the bytes a client
sees: status lines, framing, keep-alive, pipelining, limits, timeouts, and that no
input, however malformed, stops the server from answering the next client.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.httpclient import HttpStatusError, KeepAliveClient
from meshd.httpserver import HttpServer, Limits, Request, Response, json_response

pytestmark = pytest.mark.timeout(60)

FAST = Limits(
    request_timeout=0.3, idle_timeout=0.5, write_timeout=0.5, shutdown_grace=1.0, max_connections=4
)
BIG = 32 * 1024 * 1024  # more than loopback socket buffers hold


def make_server(limits: Limits = FAST) -> HttpServer:
    async def hello(request: Request) -> Response:
        return json_response({"hello": "world", "path": request.path})

    async def echo(request: Request) -> Response:
        body = await request.body()
        return json_response({"length": len(body), "text": body.decode(errors="replace")})

    async def ignore(request: Request) -> Response:  # never reads the body
        return json_response({"ignored": True})

    async def fail(request: Request) -> Response:
        raise RuntimeError("handler bug")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.3)
        return json_response({"slow": True})

    async def big(request: Request) -> Response:
        return Response(200, b"x" * BIG)

    return HttpServer(
        {
            "/hello": {"GET": hello},
            "/echo": {"POST": echo},
            "/ignore": {"POST": ignore},
            "/fail": {"GET": fail},
            "/slow": {"GET": slow},
            "/big": {"GET": big},
        },
        limits,
    )


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, int]]:
    srv = make_server()
    _, port = await srv.start("127.0.0.1", 0)
    try:
        yield srv, port
    finally:
        await srv.close()


async def read_response(
    reader: asyncio.StreamReader, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed, as the server always sends)."""
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 100:
        return status, headers, b""
    length = 0 if head_only else int(headers["content-length"])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return status, headers, body


async def exchange(
    port: int, data: bytes, count: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return [await read_response(reader) for _ in range(count)]
    finally:
        writer.close()


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def test_routes_head_404_405(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    ((status, headers, body),) = await exchange(port, get("/hello?x=1"))
    assert status == 200
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body) == {"hello": "world", "path": "/hello"}
    ((status, headers, body),) = await exchange(port, get("/%68ello"))  # percent-decoded
    assert status == 200 and json.loads(body)["path"] == "/hello"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n" + get("/hello"))
    status, headers, body = await read_response(reader, head_only=True)
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""
    assert (await read_response(reader))[0] == 200  # the HEAD sent no body: in sync
    writer.close()
    ((status, headers, body),) = await exchange(port, get("/nope"))
    assert (status, body) == (404, b"404: Not Found")
    ((status, headers, body),) = await exchange(port, b"POST /hello HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET,HEAD"
    ((status, headers, _),) = await exchange(port, get("/echo"))
    assert status == 405 and headers["allow"] == "POST"
    assert srv.responses == {200: 4, 404: 1, 405: 2}


async def test_keep_alive_and_pipelining(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(3):  # one after the other on the same connection
        writer.write(get("/hello"))
        assert (await read_response(reader))[0] == 200
    body = b'{"a": 1}'
    writer.write(  # four at once, answered in order
        get("/hello")
        + get("/nope")
        + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n"
        + body
        + get("/hello", "Connection: close\r\n")
    )
    answers = [await read_response(reader) for _ in range(4)]
    assert [a[0] for a in answers] == [200, 404, 200, 200]
    assert json.loads(answers[2][2]) == {"length": 8, "text": '{"a": 1}'}
    assert answers[3][1].get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # and then it closed
    writer.close()


async def test_unread_body_is_drained_and_chunked_bodies_read(
    server: tuple[HttpServer, int],
) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello" + get("/hello")
    )
    assert (await read_response(reader))[0] == 200
    assert (await read_response(reader))[0] == 200  # the body did not become a request
    chunked = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    writer.write(chunked + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body) == {"length": 5, "text": "abcde"}
    writer.close()


async def test_expect_100_continue(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (await read_response(reader))[0] == 100
    writer.write(b"ok")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["text"] == "ok"
    writer.close()


async def test_bad_requests_get_400_and_the_server_goes_on(
    server: tuple[HttpServer, int],
) -> None:
    srv, port = server
    for bad in (
        b"HELLO\r\n\r\n",
        b"GET /hello HTTP/9.9\r\nHost: t\r\n\r\n",
        b"GET /hello HTTP/1.1\r\n\r\n",  # no Host
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        get("/hello", f"X-Long: {'a' * 9000}\r\n"),  # head over 8 KiB, in one piece
        get("/hello?" + "a" * 9000),
    ):
        ((status, headers, _),) = await exchange(port, bad)
        assert status == 400, bad[:40]
        assert headers.get("connection") == "close"
    assert srv.responses == {400: 7}
    assert (await exchange(port, get("/hello")))[0][0] == 200


async def test_a_head_too_large_in_pieces_is_refused(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: t\r\n")
    for _ in range(20):  # 20 KiB of headers, 1 KiB a write: h11 bounds the incomplete head
        writer.write(b"X-A: " + b"a" * 1019 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0)
    assert (await read_response(reader))[0] == 400
    writer.close()


async def test_oversized_bodies_get_413(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    big = 64 * 1024 + 1
    head = f"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {big}\r\n\r\n".encode()
    ((status, headers, body),) = await exchange(port, head + b"x" * big)
    assert status == 413 and headers["connection"] == "close"
    assert body == b"Maximum request body size 65536 exceeded."
    chunked = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"8000\r\n" + b"y" * 0x8000 + b"\r\n"
    ((status, _, _),) = await exchange(port, chunked + chunk * 3 + b"0\r\n\r\n")
    assert status == 413
    # A handler that does not read a body still bounds the drain: answer, then close.
    ignore = f"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: {big}\r\n\r\n".encode()
    ((status, headers, _),) = await exchange(port, ignore + b"z" * big)
    assert status == 200 and headers["connection"] == "close"
    assert srv.responses == {413: 2, 200: 1}


async def test_handler_error_is_500_and_counted(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    ((status, _, body),) = await exchange(port, get("/fail"))
    assert (status, body) == (500, b"500: Internal Server Error")
    assert (await exchange(port, get("/hello")))[0][0] == 200
    assert srv.responses == {500: 1, 200: 1}


async def test_timeouts(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    # Half a request, then silence: dropped after request_timeout, counted.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHo")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # A body that never comes.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert srv.dropped["timeout"] == 2
    # An idle keep-alive connection is closed after idle_timeout: a normal end.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/hello"))
    assert (await read_response(reader))[0] == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert srv.dropped == {"timeout": 2}


async def test_a_client_that_does_not_read_is_dropped(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(get("/big"))  # and never read the answer
    for _ in range(100):
        if srv.dropped["write_timeout"]:
            break
        await asyncio.sleep(0.05)
    assert srv.dropped == {"write_timeout": 1}

    def serving() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_coro().__name__ == "_serve")

    for _ in range(100):  # its task ends: not stuck in a close that waits for a flush
        if not serving():
            break
        await asyncio.sleep(0.05)
    assert serving() == 0
    sock.close()


async def test_connection_limit(server: tuple[HttpServer, int]) -> None:
    srv, port = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(FAST.max_connections)]
    for reader, writer in held:  # each one in use
        writer.write(get("/hello"))
        assert (await read_response(reader))[0] == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
    writer.close()
    assert srv.dropped["connection_limit"] == 1
    for _, w in held:
        w.close()


async def test_close_lets_a_request_in_flight_finish() -> None:
    srv = make_server()
    _, port = await srv.start("127.0.0.1", 0)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/slow"))
    await asyncio.sleep(0.1)  # the handler is running
    await srv.close()
    status, headers, body = await read_response(reader)
    assert status == 200 and headers["connection"] == "close" and json.loads(body) == {"slow": True}
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # idle: closed at once
    for w in (writer, idle_writer):
        w.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# Requests built from valid pieces and junk, for the property below.
_piece = st.sampled_from(
    [
        b"GET ", b"POST ", b"PUT ", b"/hello", b"/echo", b"/ignore", b"/fail", b"/",
        b"?q", b"%", b"%2", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2", b"\r\n", b"\n", b"Host: t",
        b"Content-Length: 3", b"Content-Length: -1", b"Content-Length: 99999999999",
        b"Transfer-Encoding: chunked", b"Connection: close", b"Expect: 100-continue", b": ",
        b"3\r\nabc\r\n", b"0\r\n\r\n", b"ffffffff\r\n", b"\x00", b"\xff", b"a" * 300,
    ]
)  # fmt: skip
_request = st.one_of(
    st.lists(_piece, max_size=24).map(b"".join),
    st.binary(max_size=512),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_request)
def test_any_input_gets_http_or_nothing_and_the_server_survives(data: bytes) -> None:
    """Whatever the bytes, the server answers with well-formed HTTP/1.1 responses (or
    closes), never crashes, and still answers the next client."""

    async def run() -> None:
        srv = make_server()
        _, port = await srv.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            if writer.can_write_eof():
                writer.write_eof()  # end of input: no waiting for request timeouts
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            rest = raw
            while rest:  # no HEAD among the pieces: every response carries its body
                assert rest.startswith(b"HTTP/1.1 "), raw[:80]
                status = int(rest[9:12])
                assert status in (100, 200, 400, 404, 405, 413, 500), raw[:80]
                head, sep, rest = rest.partition(b"\r\n\r\n")
                assert sep, raw[:200]
                lengths = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                assert len(lengths) == (0 if status == 100 else 1), head
                rest = rest[sum(lengths) :]
            assert srv.dropped.get("error", 0) == 0
            ((status, _, _),) = await exchange(port, get("/hello"))
            assert status == 200
        finally:
            await srv.close()

    asyncio.run(run())


def test_port_in_use_is_an_oserror() -> None:
    """A taken port fails start() with OSError (the agent reports it as one sentence)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def run() -> None:
        srv = make_server()
        with pytest.raises(OSError):
            await srv.start("127.0.0.1", port)

    try:
        asyncio.run(run())
    finally:
        holder.close()


async def test_benchmark_client_reuses_and_reopens_its_connection(
    server: tuple[HttpServer, int],
) -> None:
    """benchmarks/httpclient.py (the vs_serf poller) against this server."""
    srv, port = server
    client = KeepAliveClient(timeout=5)
    try:
        for _ in range(5):
            assert (await client.get_json("127.0.0.1", port, "/hello"))["hello"] == "world"
        assert len(srv._conns) == 1  # one kept-alive connection for all five
        status, body = await client.post_json("127.0.0.1", port, "/echo", {"a": 1}, {})
        assert status == 200 and json.loads(body) == {"length": 8, "text": '{"a": 1}'}
        await asyncio.sleep(FAST.idle_timeout + 0.3)  # the server closes the idle connection
        assert (await client.get_json("127.0.0.1", port, "/hello"))["path"] == "/hello"
        with pytest.raises(HttpStatusError) as err:
            await client.get_json("127.0.0.1", port, "/nope")
        assert err.value.status == 404
    finally:
        await client.close()
    assert srv.dropped == {}
