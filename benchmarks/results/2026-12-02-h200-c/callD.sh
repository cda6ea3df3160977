#!/bin/bash
# device call D: DDP on 1 rank with the identity hook vs none; the DDP graph test; FUSED_PROJ A/B in one process
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=src TRITON_CACHE_DIR=/tmp/tc
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "DDP graph test"
timeout -k 5 100 python3 -m pytest -q --tb=short -p no:cacheprovider -m gpu tests/train/test_dist.py -k "cuda_graph_step" 2>&1 | tail -3
pkill -9 -f "pytest|multiprocessing.spawn"; sleep 1
for s in ddp none; do
  el "pretrain 200 steps $s"
  [ $s = none ] && pre="-m flasht5.cli" || pre="-m torch.distributed.run --nproc-per-node=1 -m flasht5.cli"
  timeout -k 5 100 python3 $pre train configs/pretrain/t5-base-ul2.yaml --train.steps=200 --train.log_every=10 \
    --train.eval_every=200 --train.progress=false --train.samples=0 --train.out_dir=/tmp/$s --dist.strategy=$s \
    --data.tokenizer=runs/t5-base-ul2/tokenizer --data.store=/tmp/store-$s 2>&1 | grep -v -i "warn" | tail -2
  cp /tmp/$s/metrics.jsonl $OUT/metrics-$s.jsonl
done
pkill -9 -f "torch.distributed|multiprocessing.spawn"; sleep 1
python3 - <<'PY'
import json, statistics as st
for s in ("none", "ddp"):
    rows = [json.loads(l) for l in open(f"/tmp/{s}/metrics.jsonl")]
    t = [r for r in rows if "tokens_per_s" in r and r["step"] > 50]
    print(s, "rows", len(t), "median tok/s", round(st.median(r["tokens_per_s"] for r in t)), "min", round(min(r["tokens_per_s"] for r in t)),
          "max", round(max(r["tokens_per_s"] for r in t)), "graphed", all(r.get("graphed") for r in t), "loss@200", t[-1]["loss"])
PY
el "FUSED_PROJ A/B"
timeout -k 5 90 python3 benchmarks/results/2026-12-02-h200-c/ab_fused.py 2>&1 | grep -v Warn | tail -4
el done
