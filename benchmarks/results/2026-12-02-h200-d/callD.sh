#!/bin/bash
# device call D: generation end-to-end with nai-t5 (beams, 16k input) on the tensor-core decode kernel; the training
# step at 512 x 32 with the new dK/dV tiles against nai-t5
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=src:.wheels/site
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
python3 -c "import nai_t5; print('nai_t5 ok')"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "bench_generate"
timeout -k 5 200 python3 benchmarks/bench_generate.py --beams --long --no-encoder --reps 2 --budget-s 180 --out $OUT/gen 2>&1 | tail -22
rm -f $OUT/gen/*.png
el "bench_model"
timeout -k 5 110 python3 benchmarks/bench_model.py --shapes 512x32 --impls nai-t5,flasht5-graph,flasht5-bf16 --budget-s 95 --out-dir $OUT/model 2>&1 | tail -12
rm -f $OUT/model/*.png
el "done"
