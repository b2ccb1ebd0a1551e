"""`tidal health`: the gRPC health check as a command, for probes that can only run one.

A Unix-socket sidecar has no port for the kubelet's grpc probe or Docker's HEALTHCHECK to reach; an
exec probe running this command asks the same standard Health service that a grpc probe would.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tidal.access import access_from, add_access_arguments
from tidal.errors import TidalError


def add_health_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="check a server's gRPC health (exit 0 when SERVING)")
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="host:port or unix:///PATH (default %(default)s)")
    p.add_argument("--service", default="", help="'' is readiness, 'liveness' stays SERVING while draining, "
                   "a model name is that model's readiness")
    p.add_argument("--timeout-s", type=float, default=5.0, help="give up after this long")
    add_access_arguments(p)  # health needs no token, but the port may be TLS
    p.set_defaults(func=_health)


def _health(args: argparse.Namespace) -> int:
    try:
        access = access_from(args)
        with access.channel(args.url) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s, metadata=access.metadata()
            )
    except TidalError as exc:
        print(f"tidal health: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        detail = exc.details() or ("no such service" if exc.code() is grpc.StatusCode.NOT_FOUND else "")
        print(f"tidal health: {exc.code().name}: {detail}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
