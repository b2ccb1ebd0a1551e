#!/usr/bin/env bash
# The GPU device check, one command, under 5 minutes on a GPU host with tidal's dependencies installed:
#
#   perf/gpu_check.sh [OUT_DIR]        (default perf/out/gpu_check; PYTHON=... to pick the interpreter)
#
# 1. records the host (nvidia-smi, nvcc, driver, Python packages) and `tidal hardware`;
# 2. builds tidal with the CUDA kernels for this GPU's architecture (no network needed when scikit-build-core,
#    nanobind and grpcio-tools are installed; otherwise pip fetches them);
# 3. runs the GPU tests: the CUDA build tests and the backend tests (fakes, so they also run here), then
#    perf/gpu_int8_check.py (tidal's CUDA int8 GEMM exact against numpy and timed against torch._int_mm);
# 4. serves the reference MLP on the CPU and on every GPU backend `tidal hardware` finds usable, and runs
#    tidal bench at concurrency 128 against each (perf/gpu_serve_check.py);
# 5. writes OUT_DIR/RESULTS.md, a block to paste under "GPU" in perf/RESULTS.md, and prints it.
# Every step has its own time limit and a failed step is recorded, not fatal: the block says what ran.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/perf/out/gpu_check}" && cd "${1:-$ROOT/perf/out/gpu_check}" && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
cd "$ROOT"
STATUS=()

step() {  # step NAME SECONDS CMD...: runs CMD with a limit, logs to OUT/NAME.log, records the outcome
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    STATUS+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") | $((SECONDS - start)) s |")
    return $rc
}

# 1. The host.
{
    nvidia-smi --query-gpu=index,name,memory.total,compute_cap,driver_version --format=csv,noheader || echo "nvidia-smi: none"
    nvcc --version 2>/dev/null | tail -1 || echo "nvcc: none"
    "$PY" - <<'EOF'
import importlib.metadata as m
for name in ("onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "nvidia-ml-py", "numpy"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
} >"$OUT/host.txt" 2>&1

# 2. Build: the CUDA architecture of GPU 0 only, which keeps the build short.
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
BUILD_FLAGS=(-q --no-deps --force-reinstall)
[ -n "$ARCH" ] && BUILD_FLAGS+=("-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=$ARCH")
if "$PY" -c "import scikit_build_core, nanobind, grpc_tools" 2>/dev/null; then BUILD_FLAGS+=(--no-build-isolation); fi
step build 240 "$PY" -m pip install "${BUILD_FLAGS[@]}" .
step hardware 30 "$PY" -m tidal hardware --json
cp "$OUT/hardware.log" "$OUT/hardware.json" 2>/dev/null

# 3. GPU tests and the int8 GEMM against cuBLASLt.
step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_build.py \
    tests/kernels/test_gpu_int8_backend.py tests/unit/test_gpu_onnxruntime.py tests/unit/test_gpu_tensorrt.py \
    tests/unit/test_placement.py
step int8_gemm 90 "$PY" perf/gpu_int8_check.py --iters 20

# 4. Serving: CPU and every usable GPU backend under tidal bench.
step serve 200 "$PY" perf/gpu_serve_check.py "$OUT/serve" --concurrency 128 --seconds 8

# 5. The RESULTS block.
{
    echo "### GPU check ($(date -u +%Y-%m-%d), $(head -1 "$OUT/host.txt"))"
    echo
    echo '```'
    cat "$OUT/host.txt"
    echo '```'
    echo
    echo "| step | outcome | time |"
    echo "|---|---|---|"
    printf '%s\n' "${STATUS[@]}"
    echo
    echo "#### CUDA int8 GEMM (perf/gpu_int8_check.py; target: >= 0.5x torch._int_mm on the bench's shapes)"
    echo
    grep -E '^\||^NVIDIA|sm_|not|no ' "$OUT/int8_gemm.log" || echo "(no output; see int8_gemm.log)"
    echo
    echo "#### Serving (perf/gpu_serve_check.py; target: a GPU backend >= 5x the CPU backend at concurrency 128)"
    echo
    cat "$OUT/serve/serve.md" 2>/dev/null || echo "(did not run; see serve.log)"
} >"$OUT/RESULTS.md"
cat "$OUT/RESULTS.md"
