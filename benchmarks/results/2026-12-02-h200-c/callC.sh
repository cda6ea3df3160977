#!/bin/bash
# device call C: compiled-model GPU test with the inductor fallback fix, DDP 1 rank vs none, FUSED_PROJ host profile
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
export PYTHONPATH=src
export TRITON_CACHE_DIR=/tmp/tc
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "compiled model test"
timeout -k 5 150 python3 -m pytest -q -x --tb=short -p no:cacheprovider -m gpu tests/test_model_gpu.py -k "compiled" 2>&1 | tail -5
pkill -9 -f pytest; sleep 1
for s in none ddp; do
  el "pretrain 200 steps $s"
  [ $s = none ] && pre="-m flasht5.cli" || pre="-m torch.distributed.run --nproc-per-node=1 -m flasht5.cli"
  timeout -k 5 100 python3 $pre train configs/pretrain/t5-base-ul2.yaml --train.steps=200 --train.log_every=10 \
    --train.eval_every=200 --train.progress=false --train.samples=0 --train.out_dir=/tmp/$s --dist.strategy=$s \
    --data.tokenizer=runs/t5-base-ul2/tokenizer --data.store=/tmp/store-$s 2>&1 | grep -v -i "warn" | tail -4
  cp /tmp/$s/metrics.jsonl $OUT/metrics-$s.jsonl
done
pkill -9 -f "torch.distributed|multiprocessing.spawn"; sleep 1
python3 - <<'PY'
import json, statistics as st
for s in ("none", "ddp"):
    try:
        rows = [json.loads(l) for l in open(f"/tmp/{s}/metrics.jsonl")]
    except OSError as e:
        print(s, e); continue
    t = [r for r in rows if "tokens_per_s" in r and r["step"] > 50]
    print(s, "rows", len(t), "median tok/s", round(st.median(r["tokens_per_s"] for r in t)), "min", round(min(r["tokens_per_s"] for r in t)),
          "max", round(max(r["tokens_per_s"] for r in t)), "graphed", all(r.get("graphed") for r in t), "loss@200", t[-1]["loss"] if t else None,
          "fill", round(st.mean(r.get("data_input_fill", 0) for r in t), 3))
PY
for f in 0 1; do
  el "profile FUSED_PROJ=$f"
  FLASHT5_FUSED_PROJ=$f timeout -k 5 60 python3 benchmarks/results/2026-12-02-h200-c/prof_fused.py 2>&1 | grep -v Warn | tail -26
done
el done
