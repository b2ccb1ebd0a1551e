"""Command line: parse flags, set up logging, hand over to the composition root."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tidal import __version__, logs
from tidal.access import access_from, add_access_arguments
from tidal.argtypes import NON_NEGATIVE, PORT, bounded
from tidal.errors import ConfigError, InvalidArgument, TidalError
from tidal.probe import add_health_parser

# Only what `tidal health` needs is imported up here; the server, bench, optimizer and planner are imported
# where their sub-command is built or run (see _health_parser for why).


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from tidal.app import ModelControlMode
    from tidal.transport.server import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PENDING_RPCS

    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC")
    p.add_argument("--model-repository", type=Path, help="Triton-style repository; omitted: the built-in demo")
    p.add_argument(
        "--grpc-address", default="127.0.0.1", help="address to bind: 0.0.0.0 exposes the server, unix:///PATH a socket"
    )
    p.add_argument("--socket-mode", type=_octal_mode, default=0o660, help="permissions of a Unix socket (octal)")
    p.add_argument("--grpc-port", type=PORT, default=8001, help="port to bind; 0 picks a free one")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME", help="load only these models (repeat)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="largest gRPC message")
    p.add_argument("--max-pending-rpcs", type=bounded(int, 1, 1_000_000),
                   help="calls gRPC core may hold for the event loop, per method, before it drops new ones; with "
                   "--frontend native, ModelInfer calls waiting for the loop before new ones are refused "
                   f"(default: sized from the tightest configured SLO; {DEFAULT_MAX_PENDING_RPCS} without one)")
    p.add_argument("--drain-grace-s", type=NON_NEGATIVE, default=30.0, help="time for in-flight requests on shutdown")
    p.add_argument(
        "--drain-delay-s", type=NON_NEGATIVE, default=0.0, help="on shutdown, keep serving (not ready) this long first"
    )
    p.add_argument(
        "--strict-readiness",
        action="append",
        default=[],
        metavar="NAME",
        help="ServerReady is false until this model is ready (repeat)",
    )
    p.add_argument(
        "--model-control-mode",
        choices=[m.value for m in ModelControlMode],
        default=ModelControlMode.EXPLICIT.value,
        help="explicit: load/unload RPCs allowed; poll: reload what changes on disk; none: neither",
    )
    p.add_argument(
        "--repository-poll-secs", type=bounded(float, 0.1), default=15.0, help="poll period in poll mode (>= 0.1)"
    )
    p.add_argument("--metrics-port", type=PORT, default=8002, help="Prometheus /metrics port; 0 picks a free one")
    p.add_argument("--metrics-address", help="/metrics bind address (default: the gRPC one; 127.0.0.1 beside a socket)")
    p.add_argument("--no-metrics", action="store_true", help="no /metrics endpoint")
    p.add_argument("--http-port", type=PORT, default=8000, help="KServe v2 HTTP/REST and the status page; 0: free")
    p.add_argument("--http-address", help="HTTP bind address (default: the gRPC one; 127.0.0.1 beside a socket)")
    p.add_argument("--no-http", action="store_true", help="no HTTP/REST endpoint")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS (reloaded on change)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates it signed (mTLS)")
    p.add_argument("--auth-tokens", type=Path, help="file of 'infer|admin TOKEN' lines: require bearer tokens")
    p.add_argument("--frontend", choices=["grpcio", "native"], default="grpcio",
                   help="who takes gRPC calls: grpcio on the event loop, or gRPC C++ threads that hand ModelInfer "
                   "to the loop in bulk (plaintext only; README, 'Native front end')")
    p.set_defaults(func=_serve)


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an octal mode such as 660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"'{text}' is outside 000..777")
    return mode


def _serve(args: argparse.Namespace) -> int:
    from tidal.app import ModelControlMode, ServeOptions, run
    from tidal.transport.security import TlsFiles

    repository = args.model_repository
    if repository is None:
        from tidal.demo import ensure_demo_repository

        try:
            repository = ensure_demo_repository()
        except TidalError as exc:  # e.g. a full disk under the cache
            print(f"tidal: {exc}", file=sys.stderr)
            return 1
        logging.getLogger("tidal").info("serving the demo repository at %s", repository)
    if not repository.is_dir():
        print(f"tidal: model repository {repository} is not a folder", file=sys.stderr)
        return 2
    for flag, names in (("--load-model", args.load_model), ("--strict-readiness", args.strict_readiness)):
        missing = [name for name in names if not (repository / name).is_dir()]
        if missing:
            print(f"tidal: {flag} {', '.join(missing)}: no such model folder in {repository}", file=sys.stderr)
            return 2
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and not args.tls_cert):
        print("tidal: --tls-cert and --tls-key go together; --tls-client-ca needs them", file=sys.stderr)
        return 2
    if args.frontend == "native":
        from tidal.transport.native import available

        if (why := available()) is not None:
            print(f"tidal: --frontend native: {why}", file=sys.stderr)
            return 2
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    options = ServeOptions(
        model_repository=repository,
        grpc_address=args.grpc_address,
        grpc_port=args.grpc_port,
        load_models=tuple(args.load_model),
        max_message_bytes=args.max_message_bytes,
        max_pending_rpcs=args.max_pending_rpcs,
        drain_grace_s=args.drain_grace_s,
        drain_delay_s=args.drain_delay_s,
        socket_mode=args.socket_mode,
        strict_readiness=tuple(args.strict_readiness),
        model_control_mode=ModelControlMode(args.model_control_mode),
        repository_poll_s=args.repository_poll_secs,
        metrics_port=None if args.no_metrics else args.metrics_port,
        metrics_address=args.metrics_address,
        http_port=None if args.no_http else args.http_port,
        http_address=args.http_address,
        tls=tls,
        auth_tokens=args.auth_tokens,
        native_frontend=args.frontend == "native",
    )
    try:
        return run(options)
    except ConfigError as exc:  # TLS or token files that cannot be used
        print(f"tidal: {exc}", file=sys.stderr)
        return 2


def _add_control_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("control", help="read and steer the SLO controller of a running server")
    p.add_argument("-u", "--url", default="127.0.0.1:8001", help="server host:port (default %(default)s)")
    add_access_arguments(p)
    commands = p.add_subparsers(dest="control_command", required=True)
    status = commands.add_parser("status", help="per model: SLO, observed latency, rate, variant, knobs, decisions")
    status.add_argument("model", nargs="?", default="", help="one model (default: all)")
    status.add_argument("--decisions", type=bounded(int, 0), default=8, help="latest decisions to show per model")
    change = commands.add_parser("set", help="change a model's SLO or controller mode live")
    change.add_argument("model")
    change.add_argument("--version", default="", help="one version (default: every served one)")
    change.add_argument("--p99-ms", type=float, help="p99 latency target; 0 removes the SLO")
    change.add_argument("--min-accuracy", type=float, help="lowest variant accuracy to serve (0..1)")
    change.add_argument("--mode", choices=["off", "batch", "full"], help="what the controller may change")
    # The server checks the range; this only keeps the value within the wire field
    change.add_argument("--period-ms", type=bounded(int, 1, 2**32 - 1), help="control period")
    change.add_argument("--priority-p99-ms", action="append", metavar="LEVEL=MS",
                        help="per-priority target (repeat); replaces all of them")
    change.add_argument("--clear-priority-p99", action="store_true", help="drop the per-priority targets")
    change.set_defaults(decisions=8)
    knobs = commands.add_parser("knobs", help="change a model's scheduling knobs or active variant live")
    knobs.add_argument("model")
    knobs.add_argument("--version", default="", help="one version (default: every served one)")
    knobs.add_argument("--max-batch-size", type=bounded(int, 1, 2**32 - 1), help="up to the config's")
    knobs.add_argument("--max-queue-delay-us", type=bounded(int, 0, 2**64 - 1), help="batching window")
    knobs.add_argument("--preferred-batch-sizes", metavar="N,N,...",
                       help="replaces them; an empty string clears them")
    knobs.add_argument("--instances", type=bounded(int, 1, 2**32 - 1), help="up to the instances loaded")
    knobs.add_argument("--variant", help="the variant that answers (one the model loaded)")
    knobs.set_defaults(decisions=8)
    p.set_defaults(func=_control)


def _control(args: argparse.Namespace) -> int:
    from tidal.transport.control import control_set_knobs, control_set_slo, control_status, format_status

    try:
        access = access_from(args)
        if args.control_command == "status":
            models = control_status(args.url, args.model, access=access)
        elif args.control_command == "knobs":
            models = control_set_knobs(
                args.url, args.model, args.version, args.max_batch_size, args.max_queue_delay_us,
                _sizes(args.preferred_batch_sizes), args.instances, args.variant, access=access,
            )
        else:
            priority = {} if args.clear_priority_p99 else None
            for item in args.priority_p99_ms or []:
                level, _, ms = item.partition("=")
                try:
                    priority = {**(priority or {}), int(level): float(ms)}
                except ValueError:
                    raise InvalidArgument(f"--priority-p99-ms '{item}': expected LEVEL=MS") from None
            models = control_set_slo(
                args.url, args.model, args.version, args.p99_ms, args.min_accuracy, args.mode, args.period_ms, priority,
                access=access,
            )
    except TidalError as exc:
        print(f"tidal control: {exc}", file=sys.stderr)
        return 1
    print(format_status(models, args.decisions))
    return 0


def _sizes(text: str | None) -> list[int] | None:
    """`--preferred-batch-sizes`: None keeps them, '' clears them."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgument(f"--preferred-batch-sizes '{text}': expected N,N,...") from None


def build_parser() -> argparse.ArgumentParser:
    from tidal.bench.cli import add_bench_parser
    from tidal.demo_cli import add_demo_parser
    from tidal.hardware_cli import add_hardware_parser
    from tidal.optimize.cli import add_optimize_parser, add_profile_parser
    from tidal.plan_cli import add_plan_parser

    parser = _root_parser()
    sub = parser.add_subparsers(dest="command")
    _add_serve_parser(sub)
    add_demo_parser(sub)
    add_optimize_parser(sub)
    add_profile_parser(sub)
    add_bench_parser(sub)
    _add_control_parser(sub)
    add_health_parser(sub)
    add_plan_parser(sub)
    add_hardware_parser(sub)
    return parser


def _root_parser() -> argparse.ArgumentParser:
    """The global flags, one definition for the full parser and `tidal health`'s own."""
    parser = argparse.ArgumentParser(prog="tidal", description="hardware-aware inference serving runtime")
    parser.add_argument("--version", action="version", version=f"tidal {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="one line per event")
    return parser


def _command_of(argv: list[str]) -> str | None:
    """Read before any parser is built, so that `tidal health` need not build (and import) the others."""
    tokens = iter(argv)
    for token in tokens:
        if token in _GLOBAL_FLAGS_WITH_VALUE:
            next(tokens, None)
        elif not token.startswith("-"):
            return token
    return None


_GLOBAL_FLAGS_WITH_VALUE = ("--log-level", "--log-format")


def _health_parser() -> argparse.ArgumentParser:
    """The parser for `tidal health` alone.

    Docker's HEALTHCHECK and exec probes run `tidal health` every few seconds, often with a 1 s timeout (the
    kubelet's default) beside a server loading models: building every sub-command's parser imports the whole
    server (ONNX Runtime, aiohttp, the data plane), 0.7 s and 135 MB a run, where the check itself needs gRPC.
    """
    parser = _root_parser()
    add_health_parser(parser.add_subparsers(dest="command"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before anything starts CUDA: GPU numbers (instance_group gpus, CUDA_VISIBLE_DEVICES) then mean what
    # nvidia-smi and NVML show, PCI order, and not CUDA's default of the fastest first.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if _command_of(argv) == "health":
        args = _health_parser().parse_args(argv)
        logs.setup(args.log_level, args.log_format)
        return args.func(args)
    from tidal.backends import onnxruntime_missing

    if (why := onnxruntime_missing()) is not None:  # every parser but health's imports ORT (tidal optimize's)
        print(f"tidal: {why}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # plain `tidal` serves the demo, like `tidal serve`
        args = parser.parse_args([*argv, "serve"])
    logs.setup(args.log_level, args.log_format)
    return args.func(args)
