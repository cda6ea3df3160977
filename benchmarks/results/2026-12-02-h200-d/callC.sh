#!/bin/bash
# device call C: GPU tests of the carried d_lut reduction and the tensor-core decode kernel; the attention probe
# with them; generation end-to-end
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=src:.wheels/site
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "GPU tests"
timeout -k 5 170 python3 -m pytest -n 8 -q -rfE --tb=short -p no:cacheprovider -m gpu tests/ops/test_decode.py tests/test_generation_gpu.py \
  tests/ops/test_attention.py -k "main_cases or gpu_varlen or bwd_variants or atomic_fallback or other_head_dims or sm80 or fp32 or decode or generat" 2>&1 | tail -15
pkill -9 -f "pytest|multiprocessing.spawn"; sleep 2
el "probe_bwd"
timeout -k 5 150 python3 benchmarks/results/2026-12-02-h200-d/probe_bwd.py 512,2048 dq > $OUT/probe_bwd2.log 2>&1; grep "^|" $OUT/probe_bwd2.log | head -20; grep "^| dq" $OUT/probe_bwd2.log
el "bench_generate"
timeout -k 5 130 python3 benchmarks/bench_generate.py --no-encoder --reps 2 --budget-s 110 --out $OUT/gen 2>&1 | tail -14
rm -f $OUT/gen/*.png
el "done"
tar czf $OUT/tc.tgz -C /tmp tc && ls -la $OUT/tc.tgz
