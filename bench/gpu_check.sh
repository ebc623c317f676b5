#!/usr/bin/env bash
# The GPU check in one command, for a machine with an NVIDIA GPU and torch installed (no
# internet needed): build fusedres with its CUDA kernels and cuDNN backend, the cuDNN graphs
# (bench/cudnn_check.py), the tests on the GPU, compute-sanitizer on the CUDA kernels, the
# benchmark suite and its report.
#
#   bash bench/gpu_check.sh [extra pytest arguments for the bench, e.g. -k bf16]
#
# Writes bench/results/<date>-<gpu>-<commit>.{log,json,md,png}, meant to be committed. The whole
# run keeps inside GPU_CHECK_BUDGET_S seconds (default 540): every step has a time limit and the
# bench skips the cases that would start after its share (--bench-time-budget); what was cut
# shows as skipped. Other settings: PYTHON (default python3), SKIP_TESTS=1 (no tests and no
# sanitizer: all the time for the bench), SKIP_BENCH=1, BENCH_TAG (appended to the file names),
# FUSEDRES_COMMIT (the commit, for a copied tree without .git). Exits 1 if any step failed.
#
# The cuDNN backend builds from the nvidia-cudnn-frontend wheel's headers. On a machine that cannot
# reach PyPI, carry the wheel (for that machine's Python) in .whl/: it is installed first.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
budget=${GPU_CHECK_BUDGET_S:-540}
python=${PYTHON:-python3}
results=bench/results
failures=()
skipped=()

say() { echo "=== [$((SECONDS - start)) s] $*"; }
seconds_left() { echo $((budget - (SECONDS - start))); }

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA GPU here; this script is for a GPU machine" >&2
  exit 2
fi
gpu=$("$python" -c 'import torch; print(torch.cuda.get_device_name())')
gpu_slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
if commit=$(git rev-parse --short=10 HEAD 2>/dev/null); then
  [ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
else
  commit=${FUSEDRES_COMMIT:-unknown}
  commit=${commit:0:10}
fi
stem="$(date -u +%F)-$gpu_slug-$commit${BENCH_TAG:+-$BENCH_TAG}"
mkdir -p "$results"
exec > >(tee "$results/$stem.log") 2>&1

# run_step NAME LIMIT_S RESERVE_S COMMAND...: runs COMMAND for at most LIMIT_S seconds, fewer if
# the later steps' RESERVE_S would not fit otherwise; a failure is recorded and the run goes on,
# so one call reports on every step.
run_step() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  local room=$(($(seconds_left) - reserve))
  ((room < limit)) && limit=$room
  if ((limit < 20)); then
    say "$name: skipped, no time left in the budget of $budget s"
    skipped+=("$name")
    return
  fi
  say "$name (limit $limit s): $*"
  local status=0
  timeout -s INT -k 15 "$limit" "$@" || status=$?
  if ((status == 0)); then
    say "$name: ok"
  else
    local why=""
    ((status == 124)) && why=", time limit"
    say "$name: FAILED (exit $status$why)"
    failures+=("$name")
  fi
}

say "gpu_check $stem: $gpu, budget $budget s"
nvidia-smi -L || true
"$python" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())'
"$python" -c 'import triton; print("triton", triton.__version__)' || true
command -v nvcc >/dev/null && nvcc --version | tail -n 2

if ls .whl/*.whl >/dev/null 2>&1; then
  say "installing the carried wheels: $(ls .whl)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fusedres-site .whl/*.whl
  export PYTHONPATH=/tmp/fusedres-site${PYTHONPATH:+:$PYTHONPATH}
fi
say "build: pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=9.0)"
TORCH_CUDA_ARCH_LIST=9.0 FUSEDRES_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$python" -m pip install --no-build-isolation --no-deps -e .
"$python" -m fusedres info
"$python" -c 'import sys; from fusedres import _extension
sys.exit(0 if _extension.with_cuda_kernels() else "fusedres._C was built without its CUDA kernels")'
"$python" -c 'import sys; from fusedres.ops import cudnn
sys.exit(0 if cudnn.loaded() else f"the cuDNN backend is not available: {cudnn.LOAD_ERROR}")' ||
  failures+=("cudnn backend not built")

bench_reserve=$([ "${SKIP_BENCH:-0}" = 1 ] && echo 20 || echo 260)
# The cudnn backend: this GPU's DeviceProperties file (next to the results), every graph planned
# here, a converted ResNet-50 captured in CUDA graphs (eval, one train step) and replayed.
run_step "cudnn backend (bench/cudnn_check.py)" 150 $((bench_reserve + 120)) \
  "$python" -m bench.cudnn_check --out "$results" --stem "$stem"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # -rs lists the cases cuDNN does not offer (skipped with cuDNN's reason).
  run_step "cudnn graphs vs the reference (fp16, bf16, fp32, TF32)" 120 $((bench_reserve + 100)) \
    "$python" -m pytest tests/test_cudnn.py -q -rs -p no:cacheprovider -m cuda
  run_step "tests on the GPU" 240 $((bench_reserve + 100)) \
    "$python" -m pytest tests -q -p no:cacheprovider -m "cuda and not cudnn"
  run_step "the other tests" 150 $((bench_reserve + 100)) \
    "$python" -m pytest tests -q -p no:cacheprovider -m "not cuda"
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ -x "$sanitizer" ]; then
    # Without the caching allocator each tensor is its own allocation: memcheck sees overruns.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    run_step "compute-sanitizer memcheck" 120 $((bench_reserve + 40)) \
      "$sanitizer" --tool memcheck --error-exitcode 1 "$python" -m bench.sanitize_kernels
    for tool in racecheck synccheck; do
      run_step "compute-sanitizer $tool" 60 "$bench_reserve" \
        "$sanitizer" --tool "$tool" --error-exitcode 1 "$python" -m bench.sanitize_kernels --quick
    done
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
  else
    say "compute-sanitizer: not found (looked for $sanitizer)"
    failures+=("compute-sanitizer (not found)")
  fi
fi

json="$results/$stem.json"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # The bench starts no case in its last 90 s (a torch.compile of a training step takes about
  # that); the time limit is the backstop, and an interrupted pytest still writes the JSON.
  bench_limit=$(($(seconds_left) - 20))
  run_step "bench" "$bench_limit" 20 \
    "$python" -m pytest bench -q -p no:cacheprovider --bench-time-budget $((bench_limit - 90)) \
    --benchmark-json "$json" "$@"
  if [ -f "$json" ]; then
    run_step "report" 60 0 "$python" bench/report.py "$json"
  fi
fi

say "done; files:" "$results/$stem".*
((${#skipped[@]} == 0)) || echo "skipped for lack of time: ${skipped[*]}"
if ((${#failures[@]})); then
  echo "FAILED: ${failures[*]}"
  exit 1
fi
echo "all steps passed"
