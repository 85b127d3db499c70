"""The coordinator's public port: a reverse proxy that passes Flower's Fleet API and nothing else.

Why it exists. In Flower 1.41 the SuperLink is one HTTP server that serves the Fleet API (``/v1/fleet/*``, what
SuperNodes use), the Control API (``/v1/control/*``, what ``flwr run`` and ``flwr supernode register`` use) and the
Runtime API (``/v1/runtime/*``, what the ServerApp uses) on one port, and the open-source Control API accepts every
request. Anyone who reaches that port could start their own ServerApp on the coordinator's host and their ClientApp
on every connected device, with TLS on and with SuperNode authentication on (shown on loopback, 2026-12-02). Flower
has no option to serve the Fleet API alone (its extension hooks load only Flower's enterprise package).

So ``fftmoe-coordinator serve`` binds the SuperLink to loopback on a private port and puts this gate on the public
port. The gate terminates TLS with the operator's certificate, passes ``POST /v1/fleet/<route>`` for exactly the
routes a SuperNode calls (``FLEET_ROUTES``) to the SuperLink, streaming bodies both ways, and answers everything else
with 404 without contacting the SuperLink. It is built from components Flower already depends on and that are
widely used: uvicorn (the server the SuperLink itself runs on, including its TLS), Starlette and httpx.

Run it as ``python -m coordinator.fleet_gate --listen HOST:PORT --upstream URL [--upstream-ca CA.pem]
[--ssl-certfile CERT --ssl-keyfile KEY]``; ``coordinator.deploy`` starts and stops it with the SuperLink.
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

FLEET_PREFIX = "/v1/fleet/"
FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
"""The Fleet API's routes in Flower 1.41 (``flwr/superlink/routers/fleet/router.py``; the SuperNode's client calls
each of them). ``tests/coordinator/test_fleet_gate.py`` compares this list with Flower's router, so an upgrade that
adds a route fails a test instead of silently breaking devices."""

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding",
     "upgrade", "host"}
)  # fmt: skip
"""Headers that describe one connection (RFC 9110 7.6.1), not the message: never forwarded."""

log = logging.getLogger("fftmoe.fleet_gate")
_SAFE = re.compile(r"[^\x20-\x7e]")


def printable(text: str, limit: int = 120) -> str:
    """``text`` for a log line: non-printable characters replaced by ``?``, cut to ``limit`` characters."""
    text = _SAFE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass: ``POST`` to one of the Fleet API's routes, nothing else."""
    return method == "POST" and path.startswith(FLEET_PREFIX) and path[len(FLEET_PREFIX) :] in FLEET_ROUTES


def forward_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The request's end-to-end headers (SuperNode authentication's signature headers among them), unchanged."""
    out = []
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1")
        if key.lower() not in HOP_BY_HOP:
            out.append((key, raw_value.decode("latin-1")))
    return out


def build_app(upstream: str, upstream_ca: Path | None = None, timeout: float = 600.0) -> Any:
    """The gate as an ASGI application forwarding allowed requests to ``upstream`` (``http(s)://127.0.0.1:PORT``).

    ``upstream_ca`` is the CA of the SuperLink's loopback certificate (when the SuperLink runs TLS, which SuperNode
    authentication requires). ``timeout`` bounds each phase of one forwarded request (seconds).
    """
    import httpx
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse

    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(upstream_ca)) if upstream_ca else False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(timeout, connect=10.0),
                               limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))  # fmt: skip

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        peer = f"{scope['client'][0]}:{scope['client'][1]}" if scope.get("client") else "?"
        if not allowed(request.method, scope["path"]):
            log.warning("refused %s %s from %s: not a Fleet API route", printable(request.method, 10), printable(scope["path"]), peer)
            await PlainTextResponse("not found\n", status_code=404)(scope, receive, send)
            return
        url = httpx.URL(path=scope["path"], query=scope.get("query_string", b""))

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                yield chunk

        try:
            upstream_request = client.build_request("POST", url, headers=forward_headers(scope["headers"]), content=body())
            response = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("SuperLink unreachable for %s from %s: %s", scope["path"], peer, printable(str(exc)))
            await PlainTextResponse("superlink unavailable\n", status_code=502)(scope, receive, send)
            return
        headers = {k: v for k, v in response.headers.multi_items() if k.lower() not in HOP_BY_HOP}
        await StreamingResponse(response.aiter_raw(), status_code=response.status_code, headers=headers,
                                background=BackgroundTask(response.aclose))(scope, receive, send)  # fmt: skip

    return app


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); ValueError naming the flag otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    """Run the gate until SIGTERM or SIGINT (uvicorn handles both and drains open requests)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m coordinator.fleet_gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT the devices connect to (the coordinator's public port).")
    parser.add_argument("--upstream", required=True, help="The SuperLink on loopback: http://127.0.0.1:PORT or https://127.0.0.1:PORT.")
    parser.add_argument("--upstream-ca", type=Path, help="CA certificate (PEM) of the SuperLink's loopback certificate.")
    parser.add_argument("--ssl-certfile", type=Path, help="TLS certificate (PEM) the devices verify; without it the gate speaks plain HTTP.")
    parser.add_argument("--ssl-keyfile", type=Path, help="The certificate's private key (PEM).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds each phase of a forwarded request may take.")
    args = parser.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        parser.error("give both --ssl-certfile and --ssl-keyfile, or neither")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s fleet-gate: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    log.info("passing only the Fleet API (%d routes) from %s:%d to %s", len(FLEET_ROUTES), host, port, args.upstream)
    uvicorn.run(build_app(args.upstream, args.upstream_ca, args.timeout), host=host, port=port, log_level="warning",
                access_log=False, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, lifespan="on",
                timeout_keep_alive=30, timeout_graceful_shutdown=5)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
