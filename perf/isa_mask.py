"""Runs a command on this CPU with some ISA extensions hidden (perf/isa_mask.c), so ISA dispatch in tidal's
kernels, in ONNX Runtime's MLAS and in tidal.backends.hardware picks what it would pick on a host without them:

    .venv/bin/python perf/isa_mask.py --hide avx512,vnni -- .venv/bin/python perf/bench_int8.py --quick

The preload is compiled with the system `cc` into a temporary folder for each run. It emulates the ISA, not
the microarchitecture: the hidden-from instructions run on this core's own units at this core's speed.
Exit status: the command's; 77 (reason on stderr) where this host cannot hide ISA extensions (no CPUID faulting,
no `cc`); 1 when the preload does not build, which is a defect of the preload, not of the host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")
CANNOT = 77  # the exit status test harnesses read as "skipped"
BROKEN = 1
GROUPS = ("avx512", "vnni")  # "vnni": every int8 dot-product extension, AMX included


def unavailable() -> str | None:
    """Why this host cannot run the mask, or None when it can."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "no /proc/cpuinfo (not Linux)"
    if "cpuid_fault" not in flags:
        return "the kernel offers no CPUID faulting ('cpuid_fault' missing from /proc/cpuinfo)"
    if shutil.which("cc") is None:
        return "no C compiler ('cc') to build perf/isa_mask.c"
    return None


def run(hide: str, command: list[str]) -> int:
    """`command`'s exit status under the mask hiding the comma-separated `hide` groups; CANNOT if unavailable."""
    if unknown := set(hide.split(",")) - set(GROUPS):
        raise ValueError(f"unknown ISA groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    if reason := unavailable():
        print(f"isa_mask: {reason}", file=sys.stderr)
        return CANNOT
    with tempfile.TemporaryDirectory(prefix="isa_mask-") as tmp:
        lib = Path(tmp) / "isa_mask.so"
        plain = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TIDAL_HIDE_ISA")}  # nested runs
        built = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(SOURCE), "-ldl"],
                               capture_output=True, text=True, env=plain)
        if built.returncode != 0:
            print(f"isa_mask: cannot build {SOURCE.name} (cc: {built.returncode}):\n{built.stderr}", file=sys.stderr)
            return BROKEN
        env = os.environ | {"LD_PRELOAD": str(lib), "TIDAL_HIDE_ISA": hide}
        return subprocess.run(command, env=env).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hide", required=True, help=f"comma-separated groups of: {', '.join(GROUPS)}")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    try:
        raise SystemExit(run(args.hide, command))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
