"""Coverage-guided fuzzing with atheris (`make fuzz`): the request decoder and the config.pbtxt parser.

    python tests/fuzz/atheris_targets.py request|pbtxt [libFuzzer flags, e.g. -max_total_time=60]

The outcomes allowed are checked by the very code the suite's hypothesis tests run (fuzz_strategies): a
decoded request or a designed status; a parsed config or a ConfigError naming the file. Anything else stops
the run with the input that caused it. Seeds are valid requests and configs, written to a temporary corpus folder.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared strategies and models

with atheris.instrument_imports():
    from fuzz_strategies import VALID_CONFIGS, decode_like_the_servicer, parse_like_the_repository, valid_request
    from google.protobuf.message import DecodeError

    from onnx_models import SIMPLE_CONFIG
    from tidal.proto import grpc_service_pb2 as pb


def request_target(data: bytes) -> None:
    msg = pb.ModelInferRequest()
    try:
        msg.ParseFromString(data)
    except DecodeError:  # gRPC refuses undecodable messages before tidal sees them
        return
    decode_like_the_servicer(msg)


def pbtxt_target(data: bytes) -> None:
    parse_like_the_repository(data.decode("utf-8", errors="replace"))


def _seeds(target: str) -> list[bytes]:
    if target == "request":
        return [valid_request(rows, typed).SerializeToString() for rows in (1, 3) for typed in (False, True)]
    return [text.encode() for text in (*VALID_CONFIGS, SIMPLE_CONFIG)]


def main() -> None:
    targets = {"request": request_target, "pbtxt": pbtxt_target}
    if len(sys.argv) < 2 or sys.argv[1] not in targets:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(targets)} [libFuzzer flags]")
    target = sys.argv.pop(1)
    corpus = Path(tempfile.mkdtemp(prefix=f"tidal-fuzz-{target}-"))
    for i, seed in enumerate(_seeds(target)):
        (corpus / f"seed{i}").write_bytes(seed)
    atheris.Setup([*sys.argv, str(corpus)], targets[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
