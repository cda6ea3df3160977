#!/bin/bash
# device call E: GPU tests of the final tree (attention with the reverted dQ kernel and the per-causal dK/dV tiles,
# the model's flash paths, the decode kernel)
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
timeout -k 5 170 python3 -m pytest -n 10 -q -rfE --tb=short -p no:cacheprovider -m gpu tests/ops/test_attention.py \
  tests/test_model_gpu.py tests/ops/test_decode.py -k "main_cases or gpu_varlen or bwd_variants or no_host_sync or \
  other_head_dims or error_ratio or packed_varlen or fused_lm or never_syncs or graph_captured or decode" 2>&1 | tail -8
