"""TLS, mutual TLS and bearer tokens, each reloaded when its file changes.

Certificates: both ports ask `CertificateStore` before every TLS handshake whether the configuration
changed; a changed set of files is checked (the key matches the certificate, the CA parses) before it is
handed over, so a half-written renewal keeps the previous certificate serving instead of failing
handshakes. Connections already open keep the certificate they started with; no request fails.

Tokens: `TokenAuth` is a server interceptor installed only when a token file is given, so a server
without tokens pays nothing. Each token has a scope: `infer` may call everything that reads or infers,
`admin` also what changes the server (load/unload, knobs, SLOs). Health stays open for probes.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from tidal.errors import ConfigError

log = logging.getLogger(__name__)

# A file that was just replaced is looked at again after at most this long.
TOKEN_RELOAD_S = 1.0


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is rewritten or replaced (renamed over, as Kubernetes secrets are)."""
    out = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append((0, 0, 0))
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from exc


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and the CA that client certificates must chain
    to (given: mutual TLS, a client without a valid certificate is refused at the handshake)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


@dataclass(frozen=True)
class _Loaded:
    """One checked reading of the TLS files, for both ports: PEM bytes for gRPC, a context for HTTPS."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext


def _load(files: TlsFiles) -> _Loaded:
    """The files' contents, once the key is known to match the certificate and the CA to parse.

    The stdlib loads from paths, so the bytes are read before and after the check and must agree: a file
    replaced in between is refused this time and taken on the next handshake."""
    before = [_read(p, "TLS file") for p in files.paths]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-cert {files.cert} / --tls-key {files.key}: not a matching PEM pair ({exc})") from exc
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cadata=before[2].decode("ascii"))
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--tls-client-ca {files.client_ca}: not PEM certificates ({exc})") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    if [_read(p, "TLS file") for p in files.paths] != before:
        raise ConfigError("TLS files changed while being read")
    return _Loaded(before[0], before[1], before[2] if files.client_ca is not None else None, context)


class CertificateStore:
    """The server's TLS configuration, re-read when its files change; the gRPC and HTTP ports both follow it.

    Each port asks before every handshake (gRPC through its certificate fetcher, HTTPS in the ClientHello
    callback, which OpenSSL calls with or without SNI), so a renewal reaches both without a restart, and each
    change is loaded and logged once whichever port sees it first."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._stamp = _stamp(files.paths)
        self._loaded = _load(files)
        self._generation = 0  # how many changes were loaded
        self._grpc_generation = 0  # the one gRPC was last handed
        self._lock = threading.Lock()  # gRPC asks from its own threads, HTTPS from the event loop

    def _current(self) -> tuple[_Loaded, int]:
        with self._lock:
            stamp = _stamp(self.files.paths)
            if stamp != self._stamp:
                self._stamp = stamp  # a bad file is reported once, and looked at again when it changes
                try:
                    self._loaded = _load(self.files)
                    self._generation += 1
                    log.info("TLS certificate reloaded from %s", self.files.cert)
                except ConfigError as exc:
                    log.error("TLS files changed but cannot be used; the previous certificate stays: %s", exc)
            return self._loaded, self._generation

    @staticmethod
    def _grpc(loaded: _Loaded) -> grpc.ServerCertificateConfiguration:
        pair = [(loaded.key, loaded.cert)]
        return grpc.ssl_server_certificate_configuration(pair, root_certificates=loaded.client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: None keeps the configuration in use."""
        loaded, generation = self._current()
        if generation == self._grpc_generation:
            return None
        self._grpc_generation = generation
        return self._grpc(loaded)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc(self._loaded), self.fetch, require_client_authentication=self.files.client_ca is not None
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTPS listener: each handshake is moved to the latest context before the certificate is sent;
        connections already open keep theirs."""
        first = self._loaded.context

        def switch(connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
            latest = self._current()[0].context
            if latest is not context:
                connection.context = latest

        first.sni_callback = switch
        return first


class Scope(enum.IntEnum):
    """Ordered: a scope allows everything the ones below it allow."""

    INFER = 1
    ADMIN = 2


_INFERENCE = "/inference.GRPCInferenceService/"
# Probes must work without a token: Kubernetes and load balancers carry none.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        _INFERENCE + "ServerLive",
        _INFERENCE + "ServerReady",
        _INFERENCE + "ModelReady",
    }
)
ADMIN_METHODS = frozenset(
    {
        _INFERENCE + "RepositoryModelLoad",
        _INFERENCE + "RepositoryModelUnload",
        "/tidal.control.TidalControl/SetKnobs",
        "/tidal.control.TidalControl/SetSlo",
    }
)


def parse_tokens(text: str, source: str) -> list[tuple[bytes, Scope]]:
    """One `SCOPE TOKEN` per line (`infer` or `admin`); blank lines and `#` comments are skipped."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("infer", "admin"):
            raise ConfigError(f"{source}:{number}: expected 'infer TOKEN' or 'admin TOKEN'")
        tokens.append((parts[1].encode(), Scope[parts[0].upper()]))
    return tokens


class TokenFile:
    """The tokens of a file, re-read at most every TOKEN_RELOAD_S when it changed. A file that cannot be
    read or parsed on a reload keeps the previous tokens; at start-up it stops the server."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._stamp = _stamp((path,))
        self._tokens = self._load()
        self._checked_s = clock()

    def _load(self) -> list[tuple[bytes, Scope]]:
        data = _read(self.path, "--auth-tokens")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--auth-tokens {self.path}: not UTF-8 text") from exc
        tokens = parse_tokens(text, str(self.path))
        if os.name == "posix" and self.path.stat().st_mode & 0o077:
            log.warning("--auth-tokens %s is readable by other users than its owner", self.path)
        return tokens

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked_s < TOKEN_RELOAD_S:
            return
        self._checked_s = now
        stamp = _stamp((self.path,))
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._tokens = self._load()
        except ConfigError as exc:
            log.error("token file changed but cannot be used; the previous tokens stay: %s", exc)
            return
        log.info("tokens reloaded from %s (%d)", self.path, len(self._tokens))

    def scope_of(self, token: bytes) -> Scope | None:
        """Every known token is compared in constant time, and all of them, so timing tells nothing."""
        self._refresh()
        found: Scope | None = None
        for known, scope in self._tokens:
            if hmac.compare_digest(known, token) and (found is None or scope > found):
                found = scope
        return found


def _bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""
    return None


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the method's that only refuses, so streaming calls end cleanly too."""

    async def refuse(_request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, handler.request_deserializer, handler.response_serializer)


def token_refusal(
    tokens: TokenFile, method: str, metadata: tuple[tuple[str, str | bytes], ...] | None
) -> tuple[grpc.StatusCode, str] | None:
    """Why a call of `method` with these headers may not run, or None: the rule of every gRPC front end."""
    if method in OPEN_METHODS:
        return None
    token = _bearer(metadata)
    if not token:
        return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send 'authorization: Bearer <token>'"
    scope = tokens.scope_of(token)
    if scope is None:
        return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
    if method in ADMIN_METHODS and scope < Scope.ADMIN:
        name = method.rpartition("/")[2]
        return grpc.StatusCode.PERMISSION_DENIED, f"{name} needs an 'admin' token; this one is 'infer'"
    return None


class TokenAuth(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer TOKEN` before the method runs; its request is never decoded."""

    def __init__(self, tokens: TokenFile) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        refused = token_refusal(self._tokens, details.method, details.invocation_metadata)
        return handler if refused is None else _refusal(handler, *refused)
