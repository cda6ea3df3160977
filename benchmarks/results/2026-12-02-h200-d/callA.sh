#!/bin/bash
# device call A: the flash-decoding figure of issue 11 (with split/tile sweeps up to batch 32), and where the
# attention backward's time goes at L=512 (issue 9)
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "bench_decode"
timeout -k 5 240 python3 benchmarks/bench_decode.py --out $OUT/decode.md 2>&1 | grep -v "^{" | tail -5
cat $OUT/decode.md
el "probe_bwd"
timeout -k 5 300 python3 benchmarks/results/2026-12-02-h200-d/probe_bwd.py 2>&1 | tee $OUT/probe_bwd.log | grep -v "^{" | tail -150
el "done"
tar czf $OUT/tc.tgz -C /tmp tc && ls -la $OUT/tc.tgz
