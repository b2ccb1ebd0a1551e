"""`tidal hardware`: what this host offers tidal, as placement sees it (CPU, GPUs, which GPU backends load).

Run it first on a new host: a KIND_GPU model that shows UNAVAILABLE gives the same reason as the
backend lines here.
"""

from __future__ import annotations

import argparse
import json
import sys

from tidal import backends
from tidal.backends import hardware


def add_hardware_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hardware", help="show the CPU, GPUs and GPU backends tidal can use on this host")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_hardware)


def report() -> dict[str, object]:
    cpu = hardware.cpu_info()
    gpu_backends = {name: backends.gpu_unavailable(name) for name in backends.names() if backends.runs_on(name, "gpu")}
    return {
        "cpu": {"model": cpu.model, "cores": cpu.cores, "isa_flags": list(cpu.isa_flags),
                "int8_kernels": cpu.best_int8_isa()},
        "gpus": [{"index": g.index, "name": g.name, "memory_mib": g.memory_mib,
                  "compute_capability": g.compute_capability, "uuid": g.uuid, "source": g.source}
                 for g in hardware.gpus()],
        "gpu_backends": {name: {"usable": reason is None, "reason": reason} for name, reason in gpu_backends.items()},
    }


def _hardware(args: argparse.Namespace) -> int:
    found = report()
    if args.json:
        json.dump(found, sys.stdout, indent=2)
        print()
        return 0
    cpu = found["cpu"]
    print(f"CPU: {cpu['model']}, {cpu['cores']} usable cores, ISA {' '.join(cpu['isa_flags']) or '-'}, "
          f"int8 kernels {cpu['int8_kernels'] or 'none (needs AVX2)'}")
    gpus = found["gpus"]
    if not gpus:
        print("GPUs: none found (NVML and nvidia-smi; CUDA_VISIBLE_DEVICES applies)")
    for g in gpus:
        print(f"GPU {g['index']}: {g['name']}, {g['memory_mib']} MiB, compute capability "
              f"{g['compute_capability'] or '?'} (from {g['source']})")
    ready = "usable" if gpus else "installed, but no GPU here to run on"
    for name, state in found["gpu_backends"].items():
        print(f"backend {name} on GPU: {ready if state['usable'] else 'not usable: ' + state['reason']}")
    return 0
