#!/bin/bash
# device call B: the tensor-core flash-decoding kernel (tests, sweeps) and kernel-timed attention tiles at L=512-2048
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "decode GPU tests, mma kernel"
FLASHT5_DECODE_KERNEL=mma timeout -k 5 100 python3 -m pytest -n 4 -q -rfE --tb=short -p no:cacheprovider -m gpu tests/ops/test_decode.py 2>&1 | tail -8
pkill -9 -f pytest; sleep 1
el "bench_decode, mma main table"
FLASHT5_DECODE_KERNEL=mma timeout -k 5 100 python3 benchmarks/bench_decode.py --quick --out $OUT/decode-mma.md 2>&1 | grep -v "^{" | tail -3
el "bench_decode sweeps (lanes main table)"
timeout -k 5 200 python3 benchmarks/bench_decode.py --out $OUT/decode-sweep.md 2>&1 | grep -v "^{" | tail -3
el "probe_bwd"
timeout -k 5 330 python3 benchmarks/results/2026-12-02-h200-d/probe_bwd.py > $OUT/probe_bwd.log 2>&1; tail -5 $OUT/probe_bwd.log
el "done"
tar czf $OUT/tc.tgz -C /tmp tc && ls -la $OUT/tc.tgz
