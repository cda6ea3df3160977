#!/bin/bash
# device call B: fine-tuning parity in fp32 (noise floor), long-input fine-tuning, DDP 1 rank vs none, scaling memory
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target .wheels/site .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=src:.wheels/site
export TRITON_CACHE_DIR=/tmp/tc
[ -f scratch/tc.tgz ] && tar xzf scratch/tc.tgz -C /tmp && echo "triton cache restored: $(ls /tmp/tc | wc -l) entries"
t0=$(date +%s); el() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
el "parity fp32"
timeout -k 5 200 python3 benchmarks/finetune_parity.py --preset base --steps 300 --precision fp32 --out $OUT/parity32 2>&1 | grep -v Warning | tail -25
rm -f $OUT/parity32/*.png
el "long finetune"
timeout -k 5 120 python3 -m flasht5.cli finetune configs/finetune/long.yaml --train.steps=100 --train.eval_every=100 \
  --train.progress=false --train.out_dir=/tmp/long --train.samples=0 2>&1 | grep -v Warning | tail -12
cp /tmp/long/metrics.jsonl $OUT/metrics-long.jsonl; tail -3 /tmp/long/metrics.jsonl
for s in none ddp; do
  el "pretrain 200 steps $s"
  pre=""; [ $s = ddp ] && pre="-m torch.distributed.run --nproc-per-node=1"
  [ $s = none ] && pre="-m flasht5.cli" || pre="$pre -m flasht5.cli"
  timeout -k 5 110 python3 $pre train configs/pretrain/t5-base-ul2.yaml --train.steps=200 --train.log_every=10 \
    --train.eval_every=200 --train.progress=false --train.samples=0 --train.out_dir=/tmp/$s --dist.strategy=$s \
    --data.tokenizer=runs/t5-base-ul2/tokenizer --data.store=runs/t5-base-ul2/store 2>&1 | grep -v -i "warn" | tail -5
  cp /tmp/$s/metrics.jsonl $OUT/metrics-$s.jsonl
done
pkill -9 -f "torch.distributed|multiprocessing.spawn"; sleep 1
el "scaling memory"
timeout -k 5 100 python3 docs/scaling_memory.py --tokens 16384 --out $OUT/scaling_memory.md 2>&1 | tail -8
el "done"
