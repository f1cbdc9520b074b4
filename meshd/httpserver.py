"""A small HTTP/1.1 server for the debug endpoint: h11 (sans-I/O) on asyncio streams.

It replaced aiohttp, which cost every agent about 10 MiB of RSS (109 modules, a C
parser, a client it never used) for eight routes on 127.0.0.1 (docs/dependencies.md).
What it keeps of a real server, because the endpoint may face a hostile local client:

* limits: request head (:attr:`Limits.max_head`), body (:attr:`Limits.max_body`, 413
  past it, read only when a handler asks for it), concurrent connections;
* timeouts: a whole request must arrive within :attr:`Limits.request_timeout` of its
  first byte, an idle keep-alive connection is closed after :attr:`Limits.idle_timeout`,
  a response the client does not read is abandoned after :attr:`Limits.write_timeout`;
* bad input never crashes it: a malformed request gets 400 and the connection closes;
  an unknown path 404, a known path with another method 405 (with ``Allow``), a handler
  that raises 500; every response is counted by status (:attr:`HttpServer.responses`)
  and every connection closed without one by reason (:attr:`HttpServer.dropped`);
* keep-alive and pipelining (h11 answers requests one at a time, in order); HEAD on
  every GET route; ``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import h11
import structlog

log = structlog.get_logger("meshd.http")

READ_SIZE: Final = 65_536
#: Bounds of the read-and-drop before a connection this server closes (see ``_linger``).
LINGER_S: Final = 2.0
LINGER_BYTES: Final = 1 << 20
JSON_TYPE: Final = "application/json; charset=utf-8"
TEXT_TYPE: Final = "text/plain; charset=utf-8"
#: Reason phrases of the statuses this server sends (others get h11's empty one).
REASONS: Final[Mapping[int, bytes]] = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Request Entity Too Large",
    500: b"Internal Server Error",
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client can make the server hold or wait for."""

    max_head: int = 8 * 1024  # request line + headers (aiohttp: 8190 bytes a line)
    max_body: int = 64 * 1024
    request_timeout: float = 10.0  # from a request's first byte to its last
    idle_timeout: float = 75.0  # keep-alive connection with no request (aiohttp's default)
    write_timeout: float = 30.0  # a response the client does not read
    max_connections: int = 64
    shutdown_grace: float = 5.0  # for requests in flight when the server closes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT_TYPE
    headers: tuple[tuple[str, str], ...] = ()


def json_response(obj: Any, status: int = 200) -> Response:
    """``json.dumps`` with its default separators, as aiohttp's ``json_response`` wrote."""
    return Response(status, json.dumps(obj).encode(), JSON_TYPE)


def text_response(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, text.encode(), TEXT_TYPE, headers)


class BodyTooLarge(Exception):
    """The request body is over :attr:`Limits.max_body` (answered 413)."""


class _RequestTimeout(Exception):
    """The client did not send the rest of its request in time (connection dropped)."""


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, without the query
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    _read: Callable[[], Awaitable[bytes]] = field(repr=False)
    _body: bytes | None = field(default=None, repr=False)

    async def body(self) -> bytes:
        """The whole body (read once); :class:`BodyTooLarge` past the limit."""
        if self._body is None:
            self._body = await self._read()
        return self._body

    async def json(self) -> Any:
        """The body as JSON; ValueError when it is not (UTF-8) JSON."""
        return json.loads((await self.body()).decode())


Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class _Conn:
    idle: bool = True  # waiting for a request: may be closed at once on shutdown


class HttpServer:
    """Serve ``routes`` (path -> method -> handler; GET also answers HEAD)."""

    def __init__(self, routes: Mapping[str, Mapping[str, Handler]], limits: Limits = Limits()):
        self.routes = routes
        self.limits = limits
        self.responses: Counter[int] = Counter()
        self.dropped: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[Any], _Conn] = {}
        self._closing = False

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port``; return the address bound (port 0 picks one)."""
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def close(self) -> None:
        """Stop listening, close idle connections, let requests in flight finish (bounded)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task, conn in list(self._conns.items()):
            if conn.idle:
                task.cancel()
        tasks = list(self._conns)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.limits.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------------ connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._closing or len(self._conns) >= self.limits.max_connections:
            self.dropped["connection_limit" if not self._closing else "closing"] += 1
            writer.close()
            return
        state = self._conns[task] = _Conn()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        try:
            await self._requests(conn, state, reader, writer)
        except _RequestTimeout:
            self.dropped["timeout"] += 1
        except TimeoutError:  # a response the client did not read
            self.dropped["write_timeout"] += 1
        except (ConnectionError, OSError):
            self.dropped["connection_error"] += 1
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except Exception:  # a bug here must cost one connection, not the agent
            log.exception("http connection failed")
            self.dropped["error"] += 1
        finally:
            del self._conns[task]
            writer.close()
            try:  # a client that reads nothing would keep an unflushed close pending
                async with asyncio.timeout(self.limits.write_timeout):
                    await writer.wait_closed()
            except Exception:
                writer.transport.abort()

    async def _requests(
        self,
        conn: h11.Connection,
        state: _Conn,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Answer requests on one connection, one at a time, until it is to close."""
        while not self._closing:
            state.idle = True
            try:
                event = await self._read_head(conn, reader)
            except h11.RemoteProtocolError as exc:
                await self._send(conn, writer, False, text_response(400, f"400: {exc}"), True)
                await self._linger(reader, writer)
                return
            if not isinstance(event, h11.Request):  # ConnectionClosed: the client is done
                return
            state.idle = False
            request, error = self._request(conn, reader, writer, event)
            close = False
            if error is not None:
                response, close = error, True
            else:
                response, close = await self._dispatch(request)
            # A body the handler did not read is drained (bounded) to reach the next request.
            close = close or self._closing
            if not close and conn.their_state is h11.SEND_BODY:
                try:
                    await request.body()
                except (BodyTooLarge, h11.RemoteProtocolError):
                    close = True
            await self._send(conn, writer, event.method == b"HEAD", response, close)
            if close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                await self._linger(reader, writer)
                return
            conn.start_next_cycle()

    def _request(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        event: h11.Request,
    ) -> tuple[Request, Response | None]:
        """The request as handlers see it, or the 400 for one h11 let through."""
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        target = event.target.decode("latin-1")
        if target.startswith(("http://", "https://")):  # absolute form: route on its path
            target = urlsplit(target).path or "/"
        path = unquote(target.partition("?")[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout

        async def read() -> bytes:
            return await self._read_body(conn, reader, writer, headers, deadline)

        request = Request(event.method.decode("latin-1"), path, headers, read)
        if event.http_version not in (b"1.0", b"1.1"):
            return request, text_response(400, "400: unsupported HTTP version")
        return request, None

    async def _dispatch(self, request: Request) -> tuple[Response, bool]:
        """The handler's response (and whether to close after it)."""
        methods = self.routes.get(request.path)
        if methods is None:
            return text_response(404, "404: Not Found"), False
        method = "GET" if request.method == "HEAD" and "GET" in methods else request.method
        handler = methods.get(method)
        if handler is None:
            allow = ",".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            return text_response(405, "405: Method Not Allowed", (("Allow", allow),)), False
        try:
            return await handler(request), False
        except BodyTooLarge:
            limit = self.limits.max_body
            return text_response(413, f"Maximum request body size {limit} exceeded."), True
        except h11.RemoteProtocolError as exc:  # a malformed body (chunking, early close)
            return text_response(400, f"400: {exc}"), True
        except _RequestTimeout:
            raise
        except Exception:
            log.exception("http handler failed", path=request.path, method=request.method)
            return text_response(500, "500: Internal Server Error"), True

    # ------------------------------------------------------------------ reading

    async def _read_head(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
        """The next request (or ConnectionClosed): idle timeout until its first byte,
        then :attr:`Limits.request_timeout` for the rest of its head."""
        loop = asyncio.get_running_loop()
        received = len(conn.trailing_data[0])
        started = received > 0
        timeout = self.limits.request_timeout if started else self.limits.idle_timeout
        deadline = loop.time() + timeout
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Event):
                # h11 bounds only a head still incomplete; one that came whole is
                # measured here, so the limit holds however the bytes arrived.
                head = received - len(conn.trailing_data[0])
                if isinstance(event, h11.Request) and head > self.limits.max_head:
                    raise h11.RemoteProtocolError("request head too large", 400)
                return event
            if event is not h11.NEED_DATA:  # PAUSED: cannot happen between requests
                return h11.ConnectionClosed()
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                if started:
                    raise _RequestTimeout from None
                return h11.ConnectionClosed()  # idle keep-alive connection: a normal end
            if data and not started:
                started = True
                deadline = loop.time() + self.limits.request_timeout
            received += len(data)
            conn.receive_data(data)

    async def _read_body(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        headers: Mapping[str, str],
        deadline: float,
    ) -> bytes:
        limit = self.limits.max_body
        declared = headers.get("content-length")
        if declared is not None and int(declared) > limit:  # h11 checked that it is a number
            raise BodyTooLarge
        if conn.they_are_waiting_for_100_continue:
            writer.write(
                conn.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    raise _RequestTimeout from None
                conn.receive_data(data)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # ConnectionClosed cannot come mid-body: h11 raises instead
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Before closing a connection the client may still be sending on (an unread or
        oversized body, a bad request), read and drop what comes for a moment (bounded):
        closing with unread data makes the kernel reset the connection, and the reset can
        destroy the response before the client has read it."""
        with contextlib.suppress(OSError, TimeoutError):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                for _ in range(LINGER_BYTES // READ_SIZE):
                    if not await reader.read(READ_SIZE):
                        break

    # ------------------------------------------------------------------ writing

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        head_only: bool,
        response: Response,
        close: bool,
    ) -> None:
        """Write one response (headers only for HEAD); count it by status."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # h11 has already given up on this connection: nothing can be sent
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        data = conn.send(
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=REASONS.get(response.status, b""),
            )
        )
        assert data is not None
        if response.body and not head_only:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.responses[response.status] += 1
        writer.write(data)
        async with asyncio.timeout(self.limits.write_timeout):
            await writer.drain()
