"""Build step: generate Python protobuf/gRPC modules from protos/ into a package folder.

grpc_tools emits absolute imports (`import model_config_pb2`); they are
rewritten to relative ones so the generated modules live inside
`tidal.proto` without touching sys.path. The descriptors go into
tidal's private pool so tidal and tritonclient can share a process.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc


def main(proto_dir: str, out_dir: str) -> int:
    src, out = Path(proto_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p) for p in src.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main([*args, *protos]) != 0:
        return 1
    names = "|".join(re.escape(Path(p).stem) for p in protos)
    pattern = re.compile(rf"^import ({names})_pb2 as", re.MULTILINE)
    for path in out.glob("*_pb2*.py*"):
        text = pattern.sub(r"from . import \1_pb2 as", path.read_text())
        if path.name.endswith("_pb2.py"):
            # Register in tidal's private pool (see tidal/proto/__init__.py).
            text = text.replace("_descriptor_pool.Default()", "_tidal_gen.POOL")
            text = text.replace(
                "from google.protobuf import descriptor_pool as _descriptor_pool",
                "from google.protobuf import descriptor_pool as _descriptor_pool\n"
                "from tidal import proto as _tidal_gen",
            )
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
