#!/bin/bash
# device call A: GPU tests of the new code, generation end-to-end, FUSED_PROJ measurement
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=src:.wheels/site
export TRITON_CACHE_DIR=/tmp/tc
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "GPU tests"
timeout -k 5 190 python3 -m pytest -n 4 -q -rfE --tb=short -p no:cacheprovider -m gpu \
  tests/test_generation_gpu.py tests/train/test_dist.py tests/train/test_optim.py tests/test_model_gpu.py \
  -k "not compiled_flash_model_equals" 2>&1 | tail -40
pkill -9 -f "pytest|multiprocessing.spawn|torch.distributed" ; sleep 3
nvidia-smi --query-compute-apps=pid,used_memory --format=csv
el "FUSED_PROJ=1 model tests"
FLASHT5_FUSED_PROJ=1 timeout -k 5 60 python3 -m pytest -q -x --tb=short -p no:cacheprovider -m gpu tests/test_model_gpu.py -k "not compiled" 2>&1 | tail -8
pkill -9 -f "pytest" ; sleep 1
el "bench_generate"
timeout -k 5 160 python3 benchmarks/bench_generate.py --beams --no-encoder --reps 2 --budget-s 140 --out $OUT/gen 2>&1 | tail -30
for f in 0 1; do
  el "bench_model FUSED_PROJ=$f"
  FLASHT5_FUSED_PROJ=$f timeout -k 5 85 python3 benchmarks/bench_model.py --shapes 512x32 --impls flasht5-eager,flasht5-graph --budget-s 70 --out-dir $OUT/fp$f 2>&1 | tail -8
done
rm -f $OUT/fp*/*.png
el "done"
tar czf $OUT/tc.tgz -C /tmp tc && ls -la $OUT/tc.tgz
