#!/usr/bin/env bash
# The GPU device check, one command, within a fixed time budget (280 s by default), on a GPU host without network:
#
#   perf/gpu_check.sh [OUT_DIR]     (default perf/out/gpu_check)
#
#   PYTHON=...               the interpreter (default: .venv/bin/python where it runs, else python3)
#   GPU_CHECK_BUDGET_S=280   the whole run's budget; each step's limit is cut to what is left of it
#   WHEELS=DIR               wheels to install first, offline (default: .whl in the repository, when present)
#
# Steps, each time-limited, each recorded (a failed or skipped step is not fatal; the block says why):
#  wheels     WHEELS/*.whl into a private folder put first on PYTHONPATH (pip --no-index --no-deps --target),
#             for what the host lacks (see "What could not run" in the block for the names);
#  host       nvidia-smi, nvcc, the Python packages tidal and this check use, checked against pyproject.toml;
#  build      tidal's kernels for GPU 0's architecture: an editable install (pip -e --no-deps --no-index
#             --no-build-isolation), which re-points an editable install carried from elsewhere at this tree and
#             keeps a developer's editable install editable (a plain `pip install .` would turn it into a copy
#             that later edits do not reach); the CMake build folder is a temporary one, not ./build;
#  hardware   `tidal hardware --json` (stdout only) into OUT_DIR/hardware.json;
#  tests      the CUDA build tests and the GPU backend tests (fakes, so they run on any host);
#  int8_gemm  perf/gpu_int8_check.py: the CUDA int8 GEMM exact and timed against torch._int_mm;
#  serve      perf/gpu_serve_check.py: the reference models on the CPU and each usable GPU backend under
#             tidal bench at concurrency 128, with whatever time is left.
# OUT_DIR/RESULTS.md (the block for perf/RESULTS.md) is rewritten as each step starts and ends, so a run stopped
# from outside still leaves every figure measured so far. OUT_DIR holds 7 files (RESULTS.md, steps.log with
# every step's output, host.txt, hardware.json, int8.md, serve.md, serve.json); bulky work (the build, the model
# repository, the server log) goes to a temporary folder, GPU_CHECK_WORK.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/perf/out/gpu_check}" && cd "${1:-$ROOT/perf/out/gpu_check}" && pwd)"
WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/tidal-gpu-check.XXXXXX")}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-280}"
WHEELS="${WHEELS:-$ROOT/.whl}"
START=$SECONDS
cd "$ROOT" || exit 1
mkdir -p "$WORK"
rm -f "$OUT"/{RESULTS.md,steps.log,host.txt,hardware.json,int8.md,serve.md,serve.json}

# An interpreter that runs and is new enough for tidal: a .venv carried from another machine usually points at
# a Python that does not exist here, and then the host's python3 (on the lent GPU machines, the one with torch).
PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PY="$candidate"
        break
    fi
done
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# CMake finds nvcc on PATH or in /usr/local/cuda; name it where it is elsewhere on a CUDA image's usual prefix.
if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ]; then
    for nvcc in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc; do
        [ -x "$nvcc" ] && export CUDACXX="$nvcc" && break
    done
fi

STEPS=(wheels host build hardware tests int8_gemm serve)
declare -A STATE   # step -> its row's cells: "outcome | time | limit"
NOTES=()           # what could not run, and why
GPU_NAME="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"

note() { NOTES+=("$1"); }
left_s() { echo $((BUDGET_S - (SECONDS - START))); }

results() {  # the block, from whatever has finished so far; renamed into place, so a reader never sees half
    local tmp="$OUT/RESULTS.md.$BASHPID"
    {
        echo "### GPU check ($(date -u +%Y-%m-%d), ${GPU_NAME:-no GPU seen by nvidia-smi})"
        echo
        echo "perf/gpu_check.sh in $((SECONDS - START)) s of its ${BUDGET_S} s budget."
        echo
        grep -sE '^(INT8 TARGET|EXACT)' "$OUT/int8.md" | sed 's/^/- /' | grep . ||
            echo "- INT8 TARGET: not measured (yet): see the int8_gemm step"
        grep -sE '^SERVE TARGET' "$OUT/serve.md" | sed 's/^/- /' | grep . ||
            echo "- SERVE TARGET: not measured (yet): see the serve step"
        echo
        echo "| step | outcome | time | limit |"
        echo "|---|---|---|---|"
        for s in "${STEPS[@]}"; do echo "| $s | ${STATE[$s]:-not reached | | } |"; done
        if [ ${#NOTES[@]} -gt 0 ]; then
            echo
            echo "#### What could not run, and why"
            echo
            printf -- '- %s\n' "${NOTES[@]}"
        fi
        echo
        echo '```'
        cat "$OUT/host.txt" 2>/dev/null || echo "(no host record)"
        echo '```'
        echo
        echo "#### CUDA int8 GEMM (perf/gpu_int8_check.py; target: >= 0.5x torch._int_mm on the bench's shapes)"
        echo
        cat "$OUT/int8.md" 2>/dev/null || echo "(did not run: see the int8_gemm step)"
        echo
        echo "#### Serving (perf/gpu_serve_check.py; target: ORT CUDA or TensorRT >= 5x the CPU backend, c=128)"
        echo
        cat "$OUT/serve.md" 2>/dev/null || echo "(did not run: see the serve step)"
    } >"$tmp"
    mv -f "$tmp" "$OUT/RESULTS.md"
}

skip() {  # skip NAME REASON
    STATE[$1]="SKIPPED: $2 | 0 s | "
    echo "gpu_check +$((SECONDS - START)) s: $1: SKIPPED: $2"
    results
}

step() {  # step NAME CAP_S CMD...: CMD under min(CAP_S, what is left of the budget), output appended to steps.log
    local name=$1 cap=$2 limit start rc
    shift 2
    limit=$(($(left_s) - 5))  # 5 s: timeout's kill grace and the last write of the block
    [ "$cap" -lt "$limit" ] && limit=$cap
    if [ "$limit" -lt 5 ]; then
        skip "$name" "no time left in the ${BUDGET_S} s budget"
        return 1
    fi
    STATE[$name]="RUNNING (or stopped from outside while running) | | ${limit} s"
    results
    printf '\n===== %s (limit %s s): %s\n' "$name" "$limit" "$*" >>"$OUT/steps.log"
    start=$SECONDS
    # While the step runs, the block is rewritten every 10 s with the rows the step has written so far
    # (int8.md, serve.md), so a stop from outside in the middle of a step loses at most 10 s of figures.
    (while sleep 10; do results; done) &
    local heartbeat=$!
    timeout -k 2 "$limit" "$@" >>"$OUT/steps.log" 2>&1 </dev/null
    rc=$?
    kill "$heartbeat" 2>/dev/null
    wait "$heartbeat" 2>/dev/null
    rm -f "$OUT"/RESULTS.md.*  # a heartbeat's half-written block, if the kill caught it writing
    case $rc in
        0) STATE[$name]="ok | $((SECONDS - start)) s | ${limit} s" ;;
        124 | 137) STATE[$name]="TIMED OUT | $((SECONDS - start)) s | ${limit} s" ;;
        *) STATE[$name]="FAILED (exit $rc; see steps.log) | $((SECONDS - start)) s | ${limit} s" ;;
    esac
    echo "gpu_check +$((SECONDS - START)) s: $name: ${STATE[$name]}"  # progress, for whoever watches stdout
    results
    return $rc
}

if [ -z "$PY" ]; then
    note "no Python 3.11+ found (PYTHON, .venv/bin/python, python3): nothing could run"
    for s in "${STEPS[@]}"; do STATE[$s]="SKIPPED: no Python 3.11+ | 0 s | "; done
    results
    cat "$OUT/RESULTS.md"
    exit 1
fi

# wheels: offline, into a folder of their own that goes first on PYTHONPATH, so nothing installed is replaced
# (an onnxruntime-gpu wheel there shadows the host's CPU onnxruntime, which shares its module name).
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if step wheels 20 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS"/*.whl; then
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    STATE[wheels]="none given ($WHEELS/*.whl) | 0 s | "
fi

# host: what is installed, against what tidal needs; deps.sh gives the later steps their go/no-go.
host_record() {
    { command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=index,name,memory.total,compute_cap,driver_version --format=csv,noheader; } ||
        echo "nvidia-smi: not found or failed"
    if "${CUDACXX:-nvcc}" --version >/dev/null 2>&1; then
        echo "nvcc: $("${CUDACXX:-nvcc}" --version | tail -1)"
    else
        echo "nvcc: none (tidal builds without its CUDA kernels)"
    fi
    echo "perf_analyzer: $(command -v perf_analyzer || echo 'not on PATH (tidal bench measures alone)')"
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)'))"
    "$PY" - "$ROOT" "$WORK/deps.sh" <<'EOF'
"""Versions, unmet requirements and the GPU-relevant facts; shell variables for gpu_check.sh in deps.sh."""
import importlib.metadata as md
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

root, deps = Path(sys.argv[1]), Path(sys.argv[2])


def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def unmet(requirements):
    """Requirement strings -> those not satisfied here (without `packaging`, presence only)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    missing = []
    for text in requirements:
        if Requirement is None:
            name = re.split(r"[\s<>=!~;\[]", text, maxsplit=1)[0]
            if version(name) is None:
                missing.append(name)
            continue
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = version(req.name)
        if have is None:
            missing.append(req.name)
        elif not req.specifier.contains(have, prereleases=True):
            missing.append(f"{req.name} (have {have}, need {req.specifier})")
    return missing


project = tomllib.loads((root / "pyproject.toml").read_text())
build = unmet(project["build-system"]["requires"])
run = unmet(project["project"]["dependencies"])
if not (version("onnxruntime") or version("onnxruntime-gpu")):  # an extra now, yet every tidal command but health
    run.append("onnxruntime")                                     # imports it
test = unmet(["pytest", "tritonclient"])  # tests/conftest.py imports tritonclient.grpc
notes = []
for name in ("numpy", "protobuf", "grpcio", "grpcio-tools", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
             "torch", "nvidia-ml-py", "tritonclient", "scikit-build-core", "nanobind", "cmake", "ninja", "pytest"):
    print(f"{name}: {version(name) or 'not installed'}")

try:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    print(f"onnxruntime providers: {', '.join(providers)}")
    if "CUDAExecutionProvider" not in providers:
        wheel = "onnxruntime-gpu" if version("onnxruntime-gpu") else f"the CPU wheel onnxruntime {version('onnxruntime')}"
        notes.append(f"ONNX Runtime CUDA/TensorRT EPs cannot run: the onnxruntime here is {wheel}, without "
                     "CUDAExecutionProvider (tidal's `gpu` extra, onnxruntime-gpu, is not installed and cannot be "
                     "fetched here)")
except ImportError as exc:
    notes.append(f"onnxruntime does not import ({exc}): tidal serve, bench and hardware cannot run")
if version("tensorrt") is None:
    notes.append("native TensorRT cannot run: tensorrt is not installed (tidal's `tensorrt` extra)")
torch_cuda = 0
try:
    import torch

    torch_cuda = int(torch.cuda.is_available())
    print(f"torch CUDA: {torch.version.cuda}, device available: {bool(torch_cuda)}")
except ImportError:
    pass
if not torch_cuda:
    notes.append("the int8 GEMM check cannot run: it needs PyTorch with CUDA (device tensors, torch._int_mm)")

editable = "none"
try:
    direct = json.loads(md.distribution("tidal").read_text("direct_url.json") or "{}")
    editable = ("editable " if direct.get("dir_info", {}).get("editable") else "installed ") + direct.get("url", "?")
except md.PackageNotFoundError:
    pass
print(f"tidal before the build: {editable}")
for label, names in (("build", build), ("run", run), ("test", test)):
    if names:
        print(f"unmet {label} requirements: {', '.join(names)}")
wanted = sorted({n.split(" ")[0] for n in build + run + test})
if wanted:
    notes.append(f"missing Python packages (no network here): {', '.join(wanted)}; put their wheels for "
                 f"cp{sys.version_info.major}{sys.version_info.minor} in .whl/ (or WHEELS) and rerun")
deps.write_text(
    f"MISSING_BUILD={shlex.quote(', '.join(build))}\nMISSING_RUN={shlex.quote(', '.join(run))}\n"
    f"MISSING_TEST={shlex.quote(', '.join(test))}\nTORCH_CUDA={torch_cuda}\n"
    f"HOST_NOTES=({' '.join(shlex.quote(n) for n in notes)})\n"
)
EOF
}
export -f host_record
export PY ROOT WORK CUDACXX
step host 20 bash -c 'host_record >"$1"' host "$OUT/host.txt"
MISSING_BUILD="" MISSING_RUN="" MISSING_TEST="" TORCH_CUDA=0
HOST_NOTES=()
if [ -f "$WORK/deps.sh" ]; then
    # shellcheck source=/dev/null
    source "$WORK/deps.sh"
else
    note "the host record did not finish: requirements were not checked, every step is tried"
    TORCH_CUDA=1
fi
for n in "${HOST_NOTES[@]}"; do note "$n"; done

# build: tidal for this GPU's architecture only, which keeps nvcc short.
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
BUILD=(-m pip install -q --disable-pip-version-check --no-deps --no-index --no-build-isolation
    -Cbuild-dir="$WORK/build" -e .)
[ -n "$ARCH" ] && BUILD+=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCH")
if [ -n "$MISSING_BUILD" ]; then
    skip build "build requirements missing: $MISSING_BUILD"
else
    step build 120 "$PY" "${BUILD[@]}"
fi
TIDAL_CUDA="$("$PY" -c 'from tidal import _kernels; print(int(_kernels.HAS_CUDA))' 2>/dev/null)"
[ -z "$TIDAL_CUDA" ] && note "tidal does not import (not built here, or its build failed): nothing after the build ran"
[ "$TIDAL_CUDA" = 0 ] && note "tidal was built without CUDA (no nvcc found by CMake): no CUDA int8 GEMM"

# hardware: stdout alone is the JSON; its log lines go to steps.log with everything else.
if [ -z "$TIDAL_CUDA" ] || [ -n "$MISSING_RUN" ]; then
    skip hardware "needs tidal and its run-time requirements (missing: ${MISSING_RUN:-tidal})"
else
    step hardware 15 bash -c '"$0" -m tidal hardware --json >"$1"' "$PY" "$OUT/hardware.json" ||
        mv -f "$OUT/hardware.json" "$WORK/hardware.json" 2>/dev/null
fi

# tests: the CUDA build tests run for real; the backend tests use fakes of NVML, ORT, TensorRT and CUDA.
if [ -z "$TIDAL_CUDA" ] || [ -n "$MISSING_TEST" ]; then
    skip tests "needs tidal, pytest and tritonclient (missing: ${MISSING_TEST:-tidal})"
else
    step tests 30 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_build.py \
        tests/kernels/test_gpu_int8_backend.py tests/unit/test_gpu_onnxruntime.py tests/unit/test_gpu_tensorrt.py \
        tests/unit/test_placement.py
fi

# int8_gemm: its rows reach int8.md as they are measured.
if [ "$TIDAL_CUDA" != 1 ] || [ "$TORCH_CUDA" != 1 ]; then
    skip int8_gemm "needs tidal built with CUDA and PyTorch seeing the GPU"
else
    step int8_gemm 45 "$PY" -u perf/gpu_int8_check.py --iters 20 --md "$OUT/int8.md"
fi

# serve: the rest of the budget; the script itself stops starting benches 15 s before its limit, so it stops
# its server and writes serve.md/serve.json itself rather than being killed.
if [ -z "$TIDAL_CUDA" ] || [ -n "$MISSING_RUN" ]; then
    skip serve "needs tidal and its run-time requirements (missing: ${MISSING_RUN:-tidal})"
else
    SERVE_S=$(($(left_s) - 5))
    [ "$SERVE_S" -gt 170 ] && SERVE_S=170
    if [ "$SERVE_S" -lt 45 ]; then
        skip serve "only ${SERVE_S} s left of the budget; the MLP on the CPU and one GPU backend need about 45 s"
    else
        step serve "$SERVE_S" "$PY" -u perf/gpu_serve_check.py "$OUT" --work "$WORK/serve" --concurrency 128 \
            --seconds 8 --budget-s $((SERVE_S - 15))
        { echo "===== serve: the server's log (last 100 lines)"; tail -n 100 "$WORK/serve/server.log"; } \
            >>"$OUT/steps.log" 2>/dev/null
    fi
fi

results
cat "$OUT/RESULTS.md"
