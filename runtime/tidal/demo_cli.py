"""Sub-command `tidal demo`: build the digits demo repository (once, cached) and serve it.

It sits above both the optimizer (which builds the demo's variants) and the server, so that neither of
those imports the other or the demo.
"""

from __future__ import annotations

import argparse
import sys

from tidal.argtypes import PORT
from tidal.errors import TidalError
from tidal.optimize.report import format_table
from tidal.repository.variants import load_manifest


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build (once, cached) the digits demo repository and serve it")
    p.add_argument("--rebuild", action="store_true", help="build again even when the cache is current")
    p.add_argument("--build-only", action="store_true", help="print the repository path and the table, do not serve")
    p.add_argument("--grpc-port", type=PORT, default=8001, help="port to serve on; 0 picks a free one")
    p.add_argument("--http-port", type=PORT, default=8000, help="KServe v2 HTTP and the status page; 0 picks one")
    p.add_argument("--metrics-port", type=PORT, default=8002, help="Prometheus /metrics; 0 picks a free one")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from tidal import demo  # keeps scikit-learn off the path of the other commands

    try:
        repository = demo.ensure_demo_repository(progress=args.progress, rebuild=args.rebuild)
    except TidalError as exc:
        print(f"tidal: error: {exc}", file=sys.stderr)
        return 2
    manifest = load_manifest(repository / demo.DEMO_MODEL / "1")
    if manifest is not None:
        print(format_table(manifest))
    print(f"demo repository: {repository}")
    if args.build_only:
        return 0
    from tidal.app import ServeOptions, run

    return run(ServeOptions(model_repository=repository, grpc_port=args.grpc_port, http_port=args.http_port,
                            metrics_port=args.metrics_port))
