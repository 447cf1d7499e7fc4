#!/usr/bin/env bash
# One GPU session's worth of checks, for the lent GPU machine (see NOTES.md):
# build with the CUDA kernels, CUDA tests, compute-sanitizer, microbenchmarks.
#   bash bench/run_gpu.sh [what...]   what: build tests sanitize ops profile (default: these),
#                                     optests (test_ops.py alone),
#                                     smol-a, accuracy (SmolLM2 in two calls), block
# Logs and tables go to $OUT (or ./gpu-out). The build leaves the extension in
# python/autoround_fast/ (ignored by git), so later calls on a warm machine skip it and run
# the source tree through PYTHONPATH. Source it (". bench/run_gpu.sh build") to keep the env.
set -uo pipefail
out=$(mkdir -p "${OUT:-gpu-out}" && cd "${OUT:-gpu-out}" && pwd)
what=${*:-build tests sanitize ops profile}
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1 && touch /tmp/site/.done
fi
export PYTHONPATH=$PWD/python:/tmp/site
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"
join_smollm2() {  # the GGUF from the halves that calls 1 and 2 carried (kept on a warm machine)
  [ -f /tmp/smol/smollm2.gguf ] || cat /tmp/smol/part.aa .smol-b/part.ab > /tmp/smol/smollm2.gguf
}
accuracy_job() {  # SCHEMES ROWS NAME: one bench.accuracy process, its log timestamped in $out/NAME.log
  # SIGABRT before the call's limit: faulthandler prints where it was
  timeout -s ABRT ${ACC_TIMEOUT:-540} python3 -X faulthandler -m bench.accuracy \
    --gguf /tmp/smol/smollm2.gguf --calib .data/lee_background.txt --eval .data/wiki_dev.txt \
    --scheme $1 --rows $2 ${ACC_ARGS:-} --out "$out/$3" \
    2>&1 | tr '\r' '\n' | grep --line-buffered -v "it/s\]" \
    | while IFS= read -r l; do echo "$(date +%T) $l"; done > "$out/$3.log"
}
for step in $what; do
  case $step in
    build) if [ -f python/autoround_fast/_C.so ] && [ -z "${REBUILD:-}" ]; then
             echo "build: kept python/autoround_fast/_C.so (REBUILD=1 to rebuild)"
           else
             (time python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/af . ) 2>&1 | tail -20 | tee "$out/build.log"
             cp /tmp/af/autoround_fast/_C.so python/autoround_fast/_C.so
             cp python/autoround_fast/_C.so "$out/_C.so"  # carry it back (.gpu-so/) to skip the build
           fi
           python3 -c "import autoround_fast as a; print('cuda kernels:', a.has_cuda_kernels(), a.__file__)" ;;
    tests) (cd tests && python3 -X faulthandler -m pytest -q -p no:cacheprovider > "$out/tests.log" 2>&1; tail -3 "$out/tests.log") ;;
    optests) # the kernels' own tests only (test_ops.py: bitwise against auto-round and the CPU)
           (cd tests && python3 -X faulthandler -m pytest -q -p no:cacheprovider test_ops.py > "$out/optests.log" 2>&1
            grep -E "^(FAILED|ERROR)|passed|failed" "$out/optests.log" | tail -15) ;;
    sanitize) for tool in memcheck racecheck; do
                compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/sanitize_cuda.py 2>&1 \
                  | tail -4 | tee "$out/sanitize-$tool.log"
              done ;;
    ops) python3 -m bench.ops --out "$out/bench_ops.md" 2>&1 | tail -40 ;;
    smol-a) mkdir -p /tmp/smol && cp .smol-a/part.aa /tmp/smol/ ;;  # call 1: carry .smol-a
    accuracy) # call 2, within 30 s of call 1: carry .smol-b .data .whl; SCHEMES/ROWS optional
             join_smollm2
             accuracy_job "${SCHEMES:-NVFP4 W4A16-G64}" "${ROWS:-rtn auto_round:0 cuda:0 auto_round:200 cuda:200}" accuracy
             tail -30 "$out/accuracy.log" ;;
    accuracy-par) # like accuracy, as parallel processes on the one card. Not for auto-round rows:
             # run beside others they slowed several-fold (NOTES.md, session 3).
             # ACC_JOBS="NVFP4=cuda:0;W4A16-G64=rtn,cuda:0" (scheme=rows;...)
             join_smollm2
             i=0
             IFS=';' read -ra jobs <<< "$ACC_JOBS"
             for job in "${jobs[@]}"; do
               i=$((i + 1))
               accuracy_job "${job%%=*}" "$(echo "${job#*=}" | tr ',' ' ')" "accuracy-$i" &
             done
             wait
             cat "$out"/accuracy-*/accuracy.json | grep -E '"(scheme|method|iters|ppl|seconds)"' ;;
    block) python3 -m bench.block --out "$out/block" ${BLOCK_ARGS:-} 2>&1 | grep -E "^\||phase|failed" ;;
    profile) ncu --kernel-name regex:fake_quant --launch-skip 4 --launch-count 4 --section SpeedOfLight \
               --section Occupancy python3 -m bench.profile_kernels > "$out/ncu.txt" 2>&1
             grep -E "^  [a-z].*fake_quant|DRAM Throughput|Duration|Achieved Occupancy" "$out/ncu.txt" ;;
  esac
done
