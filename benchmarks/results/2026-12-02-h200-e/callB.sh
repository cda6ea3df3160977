#!/bin/bash
# device call B: the d_lut rotation on the bf16 tile (dQ kernel time, tile sweep), fused projections on by default
# (the training step against nai-t5, A/B against FLASHT5_FUSED_PROJ=0), GPU tests of both
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=src:.wheels/site
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "probe_bwd"
timeout -k 5 150 python3 benchmarks/results/2026-12-02-h200-d/probe_bwd.py 512,2048 dq > $OUT/probe_bwd.log 2>&1
grep "^|" $OUT/probe_bwd.log | head -22
el "gpu tests"
timeout -k 5 170 python3 -m pytest -n 10 -q -rfE --tb=short -p no:cacheprovider -m gpu tests/ops/test_attention.py \
  tests/test_model_gpu.py -k "main_cases or gpu_varlen or bwd_variants or no_host_sync or error_ratio or \
  packed_varlen or fused_lm or never_syncs or graph_captured or table" 2>&1 | tail -8
el "bench_model"
timeout -k 5 200 python3 benchmarks/bench_model.py --shapes 512x32,2048x8 --impls nai-t5,flasht5-eager,flasht5-graph,flasht5-bf16 \
  --budget-s 180 --out-dir $OUT/model 2>&1 | tail -14
rm -f $OUT/model/*.png
el "A/B FLASHT5_FUSED_PROJ=0"
FLASHT5_FUSED_PROJ=0 timeout -k 5 80 python3 benchmarks/bench_model.py --shapes 512x32 --impls flasht5-bf16 \
  --budget-s 60 --out-dir $OUT/model-unfused 2>&1 | grep "flasht5-bf16"
rm -f $OUT/model-unfused/*.png
tar czf $OUT/tc.tgz -C /tmp tc
el "done"
