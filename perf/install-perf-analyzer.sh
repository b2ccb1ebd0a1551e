#!/usr/bin/env bash
# Installs Triton's perf_analyzer for tidal's compatibility test and benchmarks.
#
# The `perf-analyzer` PyPI package is a placeholder and its newer wheels need
# glibc 2.38; the binary shipped in tritonclient 2.48.0's manylinux wheel runs
# on glibc 2.36 with the CUDA runtime library beside it and Debian's libb64.
# It goes into its own venv (--no-deps) so it never disturbs tidal's packages.
# Prints the path of the perf_analyzer binary on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PERF_ANALYZER_VENV:-$root/.venv-perf-analyzer}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/perf_analyzer" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
    "tritonclient==2.48.0" "nvidia-cuda-runtime-cu12>=12,<13"
fi
if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; })
  else
    echo "perf_analyzer needs Debian's libb64-0d: run 'sudo apt-get install libb64-0d'" >&2
    exit 1
  fi
fi
cudart="$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cuda_runtime/lib)"
cat > "$venv/bin/perf_analyzer_env" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$venv/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$venv/bin/perf_analyzer_env"
"$venv/bin/perf_analyzer_env" --version >/dev/null 2>&1 || "$venv/bin/perf_analyzer_env" --help >/dev/null 2>&1 || {
  echo "perf_analyzer does not start" >&2; exit 1; }
echo "$venv/bin/perf_analyzer_env"
