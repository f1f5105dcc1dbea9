#!/usr/bin/env bash
# The GPU runs of the CUDA kernels in one script, for a machine with an NVIDIA GPU (compute
# capability >= 8.0), torch with CUDA, pytest and compute-sanitizer; no network or cargo needed.
#
#   here:  pip wheel --no-deps . -w .whl          # the wheel carries the kernels as PTX
#   there: bash cuda/gpu_check.sh                 # with .whl/ beside cuda/; OUT=dir for results
#
# 1. tests/test_cuda.py: every kernel against the CPU kernels and torch SDPA (up to 1M tokens),
#    opcheck on CUDA tensors; 2. compute-sanitizer memcheck over a subset of those tests (the
#    sanitizer slows kernels by 10-100x); 3. benches/bench_attention.py --device cuda.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/ctxcore-*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ctxsite .whl/ctxcore-*.whl \
        && export PYTHONPATH=/tmp/ctxsite${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
"$py" -c "import ctxcore.ops as o, ctxcore._ctxcore as c; print(c.cuda_device_info(0)); assert o.cuda_available()" \
    2>&1 | tee -a "$out/gpu.txt" || exit 1
rc=0
"$py" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE 2>&1 | tee "$out/test_cuda.txt" || rc=1
compute-sanitizer --tool memcheck --error-exitcode 9 "$py" -m pytest tests/test_cuda.py -q \
    -p no:cacheprovider -k "edge_cases or page_scores_gather or opcheck_cuda or (matches_cpu and 777)" \
    > "$out/memcheck.txt" 2>&1 || rc=1
tail -5 "$out/memcheck.txt"
"$py" benches/bench_attention.py --device cuda --out "$out/bench_attention_cuda.json" 2>&1 \
    | tee "$out/bench.txt" || rc=1
exit $rc
