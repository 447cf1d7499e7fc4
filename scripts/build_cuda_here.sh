#!/usr/bin/env bash
# usage: scripts/build_cuda_here.sh [-a ARCHS] [-p PYTHON] [-o OUT_DIR] [-b BUILD_DIR] [SOURCE_DIR]
#
# Builds autoround_fast's CUDA extension on a machine that has nvcc but no GPU and no CUDA
# torch (a CPU torch wheel is enough), and leaves it as OUT_DIR/_C.so. The extension is built
# against torch's stable ABI, so that binary loads in a GPU machine's torch (2.10 or later):
# copy it to python/autoround_fast/_C.so there, or pass it to `scripts/run_gpu.sh --so`,
# instead of building on the GPU machine.
#
#   -a ARCHS      CUDA architectures, TORCH_CUDA_ARCH_LIST syntax: the target card's compute
#                 capability, e.g. "9.0" (H100, H200), "10.0" (B200), "9.0;10.0" (both).
#                 Default: $TORCH_CUDA_ARCH_LIST, else 9.0.
#   -p PYTHON     the Python whose torch the build uses (default: python3)
#   -o OUT_DIR    where _C.so goes (default: SOURCE_DIR/.gpu-build)
#   -b BUILD_DIR  CMake's build folder, kept for incremental rebuilds
#                 (default: SOURCE_DIR/build/cuda-here)
#   SOURCE_DIR    the repository (default: the one this script belongs to)
#
# Needs: nvcc on PATH (or CUDACXX), a C compiler (cc), readelf, and in PYTHON's environment
# torch, scikit-build-core, cmake and ninja. CMake links libtorch_cuda.so (the stream shim),
# which a CPU wheel lacks: a stub with that soname stands in at link time
# (AUTOROUND_FAST_TORCH_CUDA_LIB in CMakeLists.txt), and the GPU machine's real one resolves
# at load time.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

archs=${TORCH_CUDA_ARCH_LIST:-9.0}
python=python3
out=""
build_dir=""
while getopts "a:p:o:b:h" opt; do
  case $opt in
    a) archs=$OPTARG ;;
    p) python=$OPTARG ;;
    o) out=$OPTARG ;;
    b) build_dir=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -le 1 ] || { usage >&2; exit 2; }
src=$(cd "${1:-$(dirname "$0")/..}" && pwd)
[ -f "$src/CMakeLists.txt" ] && [ -d "$src/csrc" ] || { echo "not an autoround_fast source tree: $src" >&2; exit 2; }
out=$(mkdir -p "${out:-$src/.gpu-build}" && cd "${out:-$src/.gpu-build}" && pwd)
build_dir=${build_dir:-$src/build/cuda-here}
command -v "${CUDACXX:-nvcc}" >/dev/null || { echo "nvcc not found (set PATH or CUDACXX)" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo > "$tmp/stub.c"  # stands in for libtorch_cuda.so at link time; the real one loads at run time
cc -shared -Wl,-soname,libtorch_cuda.so -o "$tmp/libtorch_cuda.so" "$tmp/stub.c"
(cd "$src" && AUTOROUND_FAST_CUDA=ON TORCH_CUDA_ARCH_LIST=$archs \
  "$python" -m pip install -q --no-build-isolation --no-deps --target "$tmp/site" \
  -C cmake.define.AUTOROUND_FAST_TORCH_CUDA_LIB="$tmp/libtorch_cuda.so" -C build-dir="$build_dir" .)
cp "$tmp/site/autoround_fast/_C.so" "$out/_C.so"
readelf -d "$out/_C.so" | grep -q 'NEEDED.*libtorch_cuda.so' \
  || { echo "libtorch_cuda.so is not a dependency of $out/_C.so" >&2; exit 1; }
echo "built $out/_C.so (CUDA archs $archs)"
