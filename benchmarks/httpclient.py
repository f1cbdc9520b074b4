"""A kept-alive HTTP/1.1 JSON client for polling many local agents (h11 on asyncio).

The benchmarks ask up to 100 agents for ``/v1/status`` every 50 ms; a new TCP
connection per request would add its own cost to the agents being measured, so each
agent gets one connection, reused request after request and opened again if the
agent closed it. meshd itself depends on h11 (its debug server), so this needs
nothing more than the agent does.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

import h11

READ_SIZE: Final = 65_536
MAX_BODY: Final = 16 * 1024 * 1024


class HttpStatusError(ValueError):
    """The agent answered, with a status other than 200."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status
        self.body = body


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, host: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        all_headers = [("Host", host), ("Content-Length", str(len(body))), *headers.items()]
        out = self.h11.send(h11.Request(method=method, target=path, headers=all_headers))
        out = (out or b"") + (self.h11.send(h11.Data(data=body)) or b"") if body else out or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        self.writer.write(out)
        await self.writer.drain()
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.reader.read(READ_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    raise ValueError(f"response body over {MAX_BODY} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection mid-response")

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return self.h11.our_state is h11.IDLE and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class KeepAliveClient:
    """One kept-alive connection per (host, port); requests on it one at a time."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._conns: dict[tuple[str, int], _Conn] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body); OSError/ConnectionError/TimeoutError when it cannot be had."""
        key = (host, port)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock, asyncio.timeout(self.timeout):
            for attempt in range(2):  # a kept connection the agent closed: one new try
                conn = self._conns.get(key)
                fresh = conn is None or not conn.reusable()
                if conn is None or fresh:
                    if conn is not None:
                        conn.close()
                    conn = _Conn(*await asyncio.open_connection(host, port))
                    self._conns[key] = conn
                try:
                    return await conn.request(method, host, path, body, headers or {})
                except (ConnectionError, h11.ProtocolError) as exc:
                    conn.close()
                    del self._conns[key]
                    if fresh or attempt:
                        raise ConnectionError(str(exc)) from exc
                except BaseException:  # timeout, cancel: the connection is mid-request
                    conn.close()
                    del self._conns[key]
                    raise
        raise AssertionError("unreachable")

    async def get_json(self, host: str, port: int, path: str) -> Any:
        status, body = await self.request(host, port, "GET", path)
        if status != 200:
            raise HttpStatusError(status, body)
        return json.loads(body)

    async def post_json(
        self, host: str, port: int, path: str, obj: Any, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        data = json.dumps(obj).encode()
        return await self.request(
            host, port, "POST", path, data, {"Content-Type": "application/json", **headers}
        )

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
