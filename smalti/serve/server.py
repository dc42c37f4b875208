"""Running the app under uvicorn with the limits an open port needs.

uvicorn has no timeout for a request's headers and no cap on connections per client, so a few thousand
half-sent requests would hold the service open (slowloris). ``GuardedH11Protocol`` adds both:

- a connection must send a complete request head within ``header_timeout`` seconds of opening, or of its
  previous response; otherwise it gets a JSON 408 and is closed;
- past ``max_connections`` in all, or ``max_per_client`` from one address, a new connection gets a JSON 503
  and is closed at once;
- a request head larger than h11's buffer gets a JSON 431, not uvicorn's plain-text 400.

Also: no ``server`` header, no trust in ``X-Forwarded-*`` headers (the origin is configured, so the
service never needs them), and TLS when a certificate is given.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from smalti.serve.service import normal_address

if TYPE_CHECKING:
    import asyncio

MAX_HEAD = 65536  # bytes h11 buffers for one request head


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    max_connections: int = 1000
    max_per_client: int = 256
    proxies: tuple[str, ...] = ()  # every client behind a reverse proxy shares its address: no per-client cap


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message, "status": status}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode() + body


def guarded_protocol(limits: ConnectionLimits) -> type:
    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = None
            address = self._address = normal_address(self.client[0]) if self.client else None
            same = sum(1 for c in self.connections if getattr(c, "_address", None) == address)
            capped = address and address not in limits.proxies and same > limits.max_per_client
            if len(self.connections) > limits.max_connections or capped:
                transport.write(_raw_response(503, "Service Unavailable", "too many connections; try again later"))
                transport.close()
                return
            self._await_head()

        def _await_head(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)
            self._cycle_when_armed = self.cycle

        def _cancel_head_timer(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is self._cycle_when_armed and not self.transport.is_closing():
                self.transport.write(
                    _raw_response(
                        408, "Request Timeout", f"no complete request head within {limits.header_timeout:g} s"
                    )
                )
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not getattr(self, "_cycle_when_armed", self.cycle):
                self._cancel_head_timer()  # a whole request head arrived

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            buffered = len(self.conn.trailing_data[0])
            if buffered >= MAX_HEAD:
                self.transport.write(
                    _raw_response(
                        431, "Request Header Fields Too Large", f"a request head of more than {MAX_HEAD} bytes"
                    )
                )
            else:
                self.transport.write(_raw_response(400, "Bad Request", "not a valid HTTP request"))
            self.transport.close()

    return GuardedH11Protocol


def run(
    app: Any,
    host: str,
    port: int,
    limits: ConnectionLimits = ConnectionLimits(),
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    import uvicorn

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + 128  # sockets, plus the ledgers and logs the service opens
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        except (ValueError, OSError):
            pass
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=guarded_protocol(limits),
        h11_max_incomplete_event_size=MAX_HEAD,
        server_header=False,
        proxy_headers=False,
        forwarded_allow_ips="",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )
