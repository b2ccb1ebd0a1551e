"""How tidal's own client commands (`control`, `health`, `bench`) reach a server that requires TLS, client
certificates or bearer tokens: the same flags for each, read into one `Access`."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from tidal.errors import InvalidArgument

TOKEN_ENV = "TIDAL_TOKEN"  # a token from the environment: it stays out of `ps` and shell history


@dataclass(frozen=True, slots=True)
class Access:
    """TLS (system roots unless `ca_file`; mutual with `cert_file` and `key_file`) and a bearer token."""

    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for plaintext."""
        if not self.tls:
            return None
        try:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))
        except OSError as exc:
            raise InvalidArgument(f"cannot read TLS file: {exc}") from None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the token, as the server's `--auth-tokens` check reads it."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, url: str) -> grpc.Channel:
        credentials = self.credentials()
        return grpc.insecure_channel(url) if credentials is None else grpc.secure_channel(url, credentials)


PLAINTEXT = Access()  # no TLS, no token


def add_access_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS and tokens (a server started with --tls-cert or --auth-tokens)")
    group.add_argument("--tls", action="store_true", help="use TLS (system roots unless --tls-ca)")
    group.add_argument("--tls-ca", help="PEM root certificates")
    group.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    group.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    group.add_argument("--token-file", help=f"file holding the bearer token (default: ${TOKEN_ENV}, if set)")


def access_from(args: argparse.Namespace) -> Access:
    """Any TLS file implies TLS; the token is a token file's first word (a trailing newline is no part of it)."""
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        try:
            lines = Path(args.token_file).read_text().split()
        except OSError as exc:
            raise InvalidArgument(f"--token-file {args.token_file}: cannot read: {exc.strerror}") from None
        if not lines:
            raise InvalidArgument(f"--token-file {args.token_file} is empty")
        token = lines[0]
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InvalidArgument("--tls-cert and --tls-key go together")
    tls = args.tls or bool(args.tls_ca or args.tls_cert)
    return Access(tls, args.tls_ca, args.tls_cert, args.tls_key, token)
