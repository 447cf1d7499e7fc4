#!/usr/bin/env bash
# Builds the CUDA extension where there is no GPU and no CUDA torch (nvcc and the CPU wheel are
# enough: the extension is built against torch's stable ABI, so the binary loads in the GPU
# machine's torch), into ${1:-.gpu-build}/_C.so. Carry that folder to the GPU machine and copy
# its _C.so into python/autoround_fast/ instead of building there (about 2 minutes of device
# time per build).
#   bash bench/build_cuda_here.sh [out dir]     TORCH_CUDA_ARCH_LIST (default 9.0)
set -euo pipefail
out=${1:-.gpu-build}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo > "$tmp/stub.c"  # stands in for libtorch_cuda.so at link time; the real one loads at run time
cc -shared -Wl,-soname,libtorch_cuda.so -o "$tmp/libtorch_cuda.so" "$tmp/stub.c"
AUTOROUND_FAST_CUDA=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  python -m pip install -q --no-build-isolation --no-deps --target "$tmp/site" \
  -C cmake.define.AUTOROUND_FAST_TORCH_CUDA_LIB="$tmp/libtorch_cuda.so" -C build-dir=build/cuda-here .
mkdir -p "$out"
cp "$tmp/site/autoround_fast/_C.so" "$out/_C.so"
readelf -d "$out/_C.so" | grep -q 'NEEDED.*libtorch_cuda.so' || { echo "libtorch_cuda.so is not a dependency" >&2; exit 1; }
echo "built $out/_C.so"
