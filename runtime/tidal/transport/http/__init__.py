"""KServe v2 HTTP/REST on the server's event loop (aiohttp), with Triton's extensions and status codes.

Each handler converts, calls the data plane, converts back, like the gRPC servicer; `/` is the live status
page. Runs on the same loop as gRPC: one data plane, one edge, one set of counters.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format
from google.protobuf.message import Message

from tidal.dataplane import DataPlane, VersionStats
from tidal.dataplane.failures import clip
from tidal.errors import InvalidArgument, TidalError, Unimplemented
from tidal.repository.manager import ServedVersion
from tidal.transport.http.codec import BINARY_TYPE, HEADER_LENGTH, JSON_TYPE, Body, encode_response, parse_json
from tidal.transport.security import Scope, TokenFile
from tidal.transport.server import check_socket_path_free, unix_socket_path
from tidal.transport.status import HTTP_STATUS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"


def json_error(text: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    """Triton's error body, cut as gRPC cuts its status message: errors may echo names, paths and shapes."""
    return web.json_response({"error": clip(text)}, status=status, headers=headers)


def error_response(exc: TidalError) -> web.Response:
    """Overload says when to come back."""
    headers = {}
    pushback = getattr(exc, "pushback_ms", None)
    if pushback is not None:
        headers["Retry-After"] = str(max(1, math.ceil(pushback / 1000)))
        headers["Retry-After-Ms"] = str(pushback)
    return json_error(str(exc), HTTP_STATUS[exc.code], headers)


class _ProtocolLog(logging.LoggerAdapter):
    """aiohttp's server log: it logs every malformed request (a request line over 8 KiB, a body that does not
    decompress) at ERROR with a traceback, which a client could turn into a log storm. Those are the
    client's mistakes: debug. Anything else stays an error."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        client_error = isinstance(exc_info, HttpProcessingError | RequestPayloadError)
        self.log(logging.DEBUG if client_error else logging.ERROR, msg, *args, exc_info=exc_info, **kwargs)


def _stats_json(row: VersionStats) -> dict[str, Any]:
    s = row.stats

    def d(x) -> dict[str, int]:
        return {"count": x.count, "ns": x.ns}

    return {
        "name": row.name, "version": row.version, "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {k: d(getattr(s, k)) for k in
                            ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")},
        "batch_stats": [{"batch_size": n, "compute_input": d(a), "compute_infer": d(b), "compute_output": d(c)}
                        for n, (a, b, c) in sorted(s.batch_stats.items())],
    }


class HttpFrontEnd:
    """The routes and their handlers; `status` feeds the status page (None: no page)."""

    def __init__(
        self,
        plane: DataPlane,
        max_body_bytes: int,
        status: Callable[[], Message] | None = None,
        tokens: TokenFile | None = None,
    ) -> None:
        self._plane = plane
        self._max_body = max_body_bytes
        self._status = status
        self._tokens = tokens
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._guard])
        self._open = {self.live, self.ready, self.model_ready}
        self._admin = {self.load, self.unload}
        get, post = self._routes("GET"), self._routes("POST")
        get("/v2/health/live", self.live)
        get("/v2/health/ready", self.ready)
        get("/v2", self.server_metadata)
        get("/v2/models/stats", self.statistics)
        for base in (_MODEL, _VERSION):
            get(base, self.model_metadata)
            get(base + "/ready", self.model_ready)
            get(base + "/config", self.model_config)
            get(base + "/stats", self.statistics)
            post(base + "/infer", self.infer)
        post("/v2/repository/index", self.repository_index)
        post("/v2/repository/models/{model}/load", self.load)
        post("/v2/repository/models/{model}/unload", self.unload)
        for path in ("/v2/systemsharedmemory{tail:.*}", "/v2/cudasharedmemory{tail:.*}", "/v2/trace/setting",
                     _MODEL + "/trace/setting", "/v2/logging"):
            self.app.router.add_route("*", path, self.unimplemented)
        if status is not None:
            get("/", self.page)
            get("/status.json", self.status_json)

    def _routes(self, method: str) -> Callable[[str, Handler], None]:
        def add(path: str, handler: Handler) -> None:
            self.app.router.add_route(method, path, handler)

        return add

    # -- every request -------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tokens, the body limit, and Triton's JSON error body for whatever goes wrong (404, 405, a bug)."""
        refusal = self._refused(request, handler)
        if refusal is not None:
            return refusal
        if (request.content_length or 0) > self._max_body:
            return self._too_large(f"request body of {request.content_length} bytes")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:  # a chunked or compressed body that outgrew the limit while read
                return self._too_large("request body")
            return json_error(f"{exc.reason}: {request.method} {request.path}", exc.status)
        except TidalError as exc:
            return error_response(exc)
        except Exception:  # a bug: answered, logged once with its traceback, and no other request touched
            log.exception("HTTP %s %s failed unexpectedly", request.method, clip(request.path))
            return json_error("internal error", 500)

    def _too_large(self, what: str) -> web.Response:
        return json_error(f"{what} is over the limit of {self._max_body} bytes (--max-message-bytes)", 413)

    def _refused(self, request: web.Request, handler: Handler) -> web.Response | None:
        """The gRPC port's token rules: health and readiness open, load/unload need an admin token. Decided by
        the handler the path resolved to, never by the path's text (a model named "ready" is no probe)."""
        if self._tokens is None or handler in self._open:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return json_error("missing bearer token: send 'Authorization: Bearer <token>'", 401,
                              {"WWW-Authenticate": "Bearer"})
        scope = self._tokens.scope_of(token.strip().encode("latin-1", "replace"))
        if scope is None:
            return json_error("invalid bearer token", 401, {"WWW-Authenticate": "Bearer"})
        if handler in self._admin and scope < Scope.ADMIN:
            return json_error("loading and unloading need an 'admin' token; this one is 'infer'", 403)
        return None

    # -- health and metadata -------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self._plane.ready() else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        return web.Response(status=200 if self._plane.model_ready(model, version) else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        name, version, extensions = self._plane.server_metadata()
        return web.json_response({"name": name, "version": version, "extensions": list(extensions)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        meta = self._plane.model_metadata(request.match_info["model"], request.match_info.get("version", ""))
        prefix = [-1] if meta.batched else []

        def tensors(specs) -> list[dict[str, Any]]:
            return [{"name": s.name, "datatype": s.datatype.wire_name, "shape": [*prefix, *s.shape]} for s in specs]

        return web.json_response({"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                                  "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)})

    async def model_config(self, request: web.Request) -> web.Response:
        config = self._plane.model_config(request.match_info["model"], request.match_info.get("version", ""))
        return web.json_response(json_format.MessageToDict(config, preserving_proto_field_name=True))

    async def statistics(self, request: web.Request) -> web.Response:
        rows = self._plane.statistics(request.match_info.get("model", ""), request.match_info.get("version", ""))
        return web.json_response({"model_stats": [_stats_json(r) for r in rows]})

    # -- inference -----------------------------------------------------------------------
    async def infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info.get("version", "")
        try:
            body = Body(await self._read(request), request.headers.get(HEADER_LENGTH))
            head = body.head(model, version)
        except web.HTTPException:  # over the limit while read: 413 in `_guard`
            raise
        except Exception as exc:
            return error_response(self._plane.failed(model, "", exc))

        def decode(served: ServedVersion, arrival_s: float, deadline_s: float | None):
            return body.decode(model, version, served.signature, arrival_s, deadline_s), body.classes()

        outcome = await self._plane.infer(head, decode)
        if isinstance(outcome, TidalError):
            return error_response(outcome)
        data, header_length = encode_response(outcome, body.binary_outputs())
        if header_length is None:
            return web.Response(body=data, content_type=JSON_TYPE)
        return web.Response(body=data, content_type=BINARY_TYPE, headers={HEADER_LENGTH: str(header_length)})

    # -- repository ----------------------------------------------------------------------
    @staticmethod
    async def _read(request: web.Request) -> bytes:
        """The whole body; one that cannot be read (a Content-Encoding that does not decode, a broken chunk)
        is the client's mistake. A body over the limit raises HTTPRequestEntityTooLarge: 413 in `_guard`."""
        try:
            return await request.read()
        except (RequestPayloadError, HttpProcessingError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
            reason = getattr(cause, "message", "") or type(cause).__name__
            raise InvalidArgument(f"the request body could not be read: {str(reason).strip()[:200]}") from None

    async def _json(self, request: web.Request) -> dict[str, Any]:
        data = await self._read(request)
        if not data:
            return {}
        parsed = parse_json(data)
        if not isinstance(parsed, dict):
            raise InvalidArgument("the request must be a JSON object")
        return parsed

    async def repository_index(self, request: web.Request) -> web.Response:
        ready = (await self._json(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("'ready' must be true or false")
        rows = await self._plane.repository_index(ready)
        return web.json_response([
            {"name": n, **({"version": v} if v else {}), "state": s, **({"reason": r} if r else {})}
            for n, v, s, r in rows
        ])

    async def load(self, request: web.Request) -> web.Response:
        params = (await self._json(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument("'parameters' must be a JSON object")
        await self._plane.load(request.match_info["model"], tuple(params))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self._json(request)
        await self._plane.unload(request.match_info["model"])
        return web.Response(status=200)

    async def unimplemented(self, request: web.Request) -> web.Response:
        what = request.path.split("/")[2].replace("sharedmemory", " shared memory").replace("cuda", "CUDA")
        return error_response(Unimplemented(f"tidal does not implement {what}"))

    # -- status page ---------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("tidal.transport.http").joinpath("status.html").read_bytes()
        return web.Response(body=html, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})

    async def status_json(self, request: web.Request) -> web.Response:
        assert self._status is not None
        return web.json_response(json_format.MessageToDict(self._status(), preserving_proto_field_name=True),
                                 headers={"Cache-Control": "no-store"})


class HttpServer:
    """Binds the front end; stays up until the process ends (see GrpcServer.prepare_exit for why)."""

    def __init__(
        self, front: HttpFrontEnd, address: str, port: int, tls: ssl.SSLContext | None = None, socket_mode: int = 0o660
    ) -> None:
        self._runner = web.AppRunner(front.app, access_log=None, handle_signals=False,
                                     logger=_ProtocolLog(logging.getLogger("aiohttp.server"), {}))
        self._address, self._port, self._tls = address, port, tls
        self.unix_path = unix_socket_path(address)  # unix:///PATH: a Unix socket of mode `socket_mode`
        self._socket_mode = socket_mode
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the bound port (0 on a Unix socket)."""
        await self._runner.setup()
        if self.unix_path is not None:
            check_socket_path_free(self.unix_path)
            site: web.BaseSite = web.UnixSite(self._runner, self.unix_path, ssl_context=self._tls)
        else:
            site = web.TCPSite(self._runner, self._address, self._port, ssl_context=self._tls, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot bind HTTP to {self._address}:{self._port}: {exc.strerror}") from None
        if self.unix_path is not None:
            os.chmod(self.unix_path, self._socket_mode)
            return 0
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self.port

    def remove_socket(self) -> None:
        """The last step before the process ends: the socket file goes with the listener."""
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)

