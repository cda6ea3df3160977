#!/bin/bash
# device call C: GPU tests of the final tree (fused projections by default, the fp32 d_lut rotation); every
# implementation on 512 x 16, 512 x 32 and the ragged fine-tuning batch
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=src:.wheels/site
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "gpu tests"
timeout -k 5 200 python3 -m pytest -n 10 -q -rfE --tb=short -p no:cacheprovider -m gpu tests/ops/test_attention.py \
  tests/test_model_gpu.py tests/ops/test_decode.py tests/test_generation_gpu.py -k "main_cases or gpu_varlen or \
  bwd_variants or no_host_sync or error_ratio or packed_varlen or fused_lm or never_syncs or graph_captured or table \
  or decode or generat" 2>&1 | tail -6
el "bench_model"
timeout -k 5 330 python3 benchmarks/bench_model.py --shapes 512x16,512x32,ragged \
  --impls hf-eager,hf-sdpa,nai-t5,flasht5-eager,flasht5-graph,flasht5-bf16 --budget-s 300 --out-dir $OUT/model 2>&1 | tail -22
rm -f $OUT/model/*.png
el "done"
