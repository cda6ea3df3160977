#!/bin/bash
# device call A: where the graph step's kernel time goes (512 x 32), the per-op host overhead
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc PYTHONPATH=src
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "prof_step"
timeout -k 5 240 python3 benchmarks/results/2026-12-02-h200-e/prof_step.py 512 32 > $OUT/prof_step.md 2>&1; tail -3 $OUT/prof_step.md
el "bench_overhead"
timeout -k 5 150 python3 benchmarks/bench_overhead.py --out $OUT/overhead.md > $OUT/overhead.log 2>&1; tail -40 $OUT/overhead.log
tar czf $OUT/tc.tgz -C /tmp tc
el "done"
