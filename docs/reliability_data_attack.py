"""The data / config / CLI part of the reliability attack (issue 14), as recorded in docs/reliability.md.

Run from a scratch folder that holds ``runs/tok`` (``flasht5 tokenizer train data/corpus/kjv_train.txt.gz --out
runs/tok --vocab-size 4000``), ``runs/shards4`` (4 x the KJV training text split into 16 files) and ``runs/ref4``
(an uninterrupted ``flasht5 pretokenize runs/shards4 --tokenizer runs/tok --out runs/ref4``), with ``flasht5`` on
the path (or FLASHT5="python -m flasht5.cli")::

    python docs/reliability_data_attack.py kill --chains 10      # 2 kill -9s per chain, then a full resume
    python docs/reliability_data_attack.py concurrent --trials 5 # two pretokenize runs into one --out
    python docs/reliability_data_attack.py trains --trials 3     # two flasht5 train runs on one fresh store
    python docs/reliability_data_attack.py cli                   # user mistakes and hostile files (needs runs/a:
                                                                 # a finished tiny `flasht5 train` run)

Every verdict is printed as one JSON line; a summary at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FLASHT5 = shlex.split(os.environ.get("FLASHT5", "flasht5"))
REF = Path("runs/ref4")


def _same_as_ref(out: Path) -> bool:
    return all((out / f).read_bytes() == (REF / f).read_bytes() for f in ("tokens.bin", "offsets.npy"))


def _store_state(out: Path) -> str:
    """ "refused" (TokenStore raises), "complete" (opens and equals the reference) or "WRONG" (opens, differs)."""
    from flasht5.data.store import TokenStore

    try:
        TokenStore(out)
    except ValueError:
        return "refused"
    return "complete" if _same_as_ref(out) else "WRONG"


def _orphans(tag: str) -> list[int]:
    """Processes still running whose command line names ``tag`` (forked tokenizer workers of a killed run)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _lock_free(out: Path) -> bool:
    from flasht5.data.store import store_lock

    try:
        with store_lock(out):
            return True
    except ValueError:
        return False


def _pretokenize(out: Path, workers: int) -> list[str]:
    return [*FLASHT5, "pretokenize", "runs/shards4", "--tokenizer", "runs/tok", "--out", str(out),
            "--workers", str(workers), "--no-progress"]  # fmt: skip


def kill(chains: int, seed: int, max_delay: float = 14.0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for c in range(chains):
        out = Path(f"runs/kill{c}")
        shutil.rmtree(out, ignore_errors=True)
        workers = 1 + c % 2
        for k in range(2):
            delay = rng.uniform(0.3, max_delay)
            proc = subprocess.Popen(_pretokenize(out, workers), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(delay)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            time.sleep(0.5)
            orphans = _orphans(str(out))
            row = {"chain": c, "kill": k, "workers": workers, "at_s": round(delay, 1), "finished_first": finished,
                   "store": _store_state(out),
                   "lock_free": _lock_free(out), "orphans": len(orphans)}  # fmt: skip
            for pid in orphans:  # ours: the killed run's workers
                os.kill(pid, signal.SIGKILL)
            rows.append(row)
            print(json.dumps(row), flush=True)
        done = subprocess.run(_pretokenize(out, workers), capture_output=True, text=True)
        row = {"chain": c, "resume_rc": done.returncode, "identical": done.returncode == 0 and _same_as_ref(out),
               "said": (done.stdout + done.stderr).strip().splitlines()[-1:]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def concurrent(trials: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for t in range(trials):
        out = Path(f"runs/cc{t}")
        shutil.rmtree(out, ignore_errors=True)
        gap = rng.uniform(0.0, 1.5)
        a = subprocess.Popen(_pretokenize(out, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(gap)
        b = subprocess.Popen(_pretokenize(out, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.perf_counter()
        out_b, _ = b.communicate()
        b_s = time.perf_counter() - t0
        out_a, _ = a.communicate()
        row = {"trial": t, "gap_s": round(gap, 2), "rc": [a.returncode, b.returncode], "second_took_s": round(b_s, 1),
               "second_said": out_b.strip().splitlines()[-1:], "first_said": out_a.strip().splitlines()[-1:],
               "store": _store_state(out)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def trains(trials: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for t in range(trials):
        base = Path(f"runs/tt{t}")
        shutil.rmtree(base, ignore_errors=True)
        tok = "runs/tok" if t else str(base / "tok")  # trial 0: both runs also train the tokenizer at once
        cmd = [*FLASHT5, "train", "configs/pretrain/demo.yaml", f"--data.tokenizer={tok}",
               f"--data.store={base / 'store'}", "--data.heldout=[]", "--train.steps=2", "--train.samples=0",
               "--train.progress=false", "--data.max_tokens=512",
               "--model.overrides={d_model: 64, d_ff: 128, num_layers: 2, num_heads: 2, d_kv: 32}"]  # fmt: skip
        gap = rng.uniform(0.1, 0.3)
        a = subprocess.Popen([*cmd, f"--train.out_dir={base / 'a'}"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
        time.sleep(gap)
        b = subprocess.Popen([*cmd, f"--train.out_dir={base / 'b'}"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
        out_b, _ = b.communicate()
        out_a, _ = a.communicate()
        from flasht5.data.store import TokenStore

        try:
            st = TokenStore(base / "store")
            store = f"{len(st)} docs, {st.num_tokens} tokens"
        except ValueError as e:
            store = f"refused: {e}"
        row = {"trial": t, "gap_s": round(gap, 2), "rc": [a.returncode, b.returncode],
               "a_said": [ln for ln in out_a.splitlines() if "error" in ln or "train store" in ln][-2:],
               "b_said": [ln for ln in out_b.splitlines() if "error" in ln or "train store" in ln][-2:],
               "traceback": "Traceback" in out_a + out_b, "store": store}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _setup_cli_fixtures() -> None:
    """Folders the mistakes below need (all under runs/cli)."""
    import torch
    from transformers import BertConfig, T5Config, T5ForConditionalGeneration

    base = Path("runs/cli")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    (base / "bad.yaml").write_text("train: {steps: 3\n")
    (base / "lr.yaml").write_text(Path("configs/pretrain/demo.yaml").read_text().replace("lr: 0.02", "lr: 1e-3"))
    (base / "trian.yaml").write_text("trian:\n  steps: 5\n")
    (base / "emptytok").mkdir()
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=64, d_kv=32, d_ff=128, num_layers=2,
                                        num_heads=2)).save_pretrained(base / "hf_t5")  # fmt: skip
    for name, edit in (("bert", {"model_type": "bert", **BertConfig().to_dict()}), ("notype", None),
                       ("halfjson", "half"), ("trunc", "trunc"), ("escape", "escape"), ("link", "link")):  # fmt: skip
        d = base / name
        shutil.copytree(base / "hf_t5", d)
        cfg = json.loads((d / "config.json").read_text())
        if isinstance(edit, dict):
            (d / "config.json").write_text(json.dumps(edit))
        elif edit is None:
            cfg.pop("model_type")
            (d / "config.json").write_text(json.dumps(cfg))
        elif edit == "half":
            (d / "config.json").write_text(json.dumps(cfg)[:40])
        elif edit == "trunc":
            with open(d / "model.safetensors", "r+b") as f:
                f.truncate(50_000)
        elif edit == "escape":
            from safetensors.torch import load_file, save_file

            state = load_file(d / "model.safetensors")
            keys = sorted(state)
            save_file({k: state[k] for k in keys[1:]}, str(d / "model-00001-of-00002.safetensors"))
            save_file({keys[0]: state[keys[0]]}, str(base / "outside.safetensors"))
            weight_map = {**dict.fromkeys(keys[1:], "model-00001-of-00002.safetensors"),
                          keys[0]: "../outside.safetensors"}  # fmt: skip
            (d / "model.safetensors").unlink()
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        elif edit == "link":
            (base / "secret.txt").write_text("SECRET CONTENT")
            (d / "tokenizer.json").symlink_to((base / "secret.txt").resolve())
    # an earlier sharded HF export in the output folder of a later convert
    T5ForConditionalGeneration.from_pretrained(base / "hf_t5").save_pretrained(base / "stale", max_shard_size="100KB")
    (base / "file").write_text("")
    (base / "e.txt").write_text("the first document\nthe second document\n")
    (base / "bad_utf8.txt").write_bytes(b"In the beginning\n\xff\xfe was the word\n")
    shutil.copytree("runs/a/final", base / "inplace")


def cli_cases() -> list[dict]:
    _setup_cli_fixtures()
    tiny = ["--model.overrides={d_model: 64, d_ff: 128, num_layers: 2, num_heads: 2, d_kv: 32}",
            "--data.tokenizer=runs/tok", "--data.store=runs/store", "--data.max_tokens=512", "--data.eval_batches=1",
            "--train.samples=0", "--train.progress=false", "--train.steps=1", "--data.heldout=[]"]  # fmt: skip
    demo = "configs/pretrain/demo.yaml"
    t, c = "runs/cli", [*FLASHT5]
    ckpt = sorted(Path("runs/a/checkpoints").glob("step-*"))[-1]
    cases = [  # (name, [commands], expect "ok" or "error", text the output must hold)
        ("malformed YAML file", [[*c, "train", f"{t}/bad.yaml"]], "error", "is not valid YAML"),
        ("malformed override", [[*c, "train", demo, "--model.overrides={d_model: 64"]], "error", "not valid YAML"),
        ("missing config file", [[*c, "train", "nope.yaml"]], "error", "does not exist"),
        ("config path is a folder", [[*c, "train", "configs"]], "error", "is a folder"),
        ("unknown section in YAML", [[*c, "train", f"{t}/trian.yaml"]], "error", "'trian' -> 'train'"),
        ("--train.device=gpu", [[*c, "train", demo, "--train.device=gpu"]], "error", "train.device must be"),
        ("--train.device=cuda, no GPU", [[*c, "train", demo, "--train.device=cuda"]], "error", "no CUDA device"),
        ("--optim.lr=1e-3", [[*c, "train", demo, *tiny, f"--train.out_dir={t}/lr1", "--optim.lr=1e-3"]], "ok", ""),
        ("lr: 1e-3 in YAML", [[*c, "train", f"{t}/lr.yaml", *tiny, f"--train.out_dir={t}/lr2"]], "ok", ""),
        ("--optim.lr=nan", [[*c, "train", demo, "--optim.lr=nan"]], "error", "finite"),
        (
            "overrides typo num_layer",
            [[*c, "train", demo, "--model.overrides={num_layer: 1, dropout: 0.5}"]],
            "error",
            "unknown key(s) ['dropout', 'num_layer'] in model.overrides",
        ),
        ("overrides typo d_mdoel", [[*c, "train", demo, "--model.overrides={d_mdoel: 64}"]], "error", "d_model"),
        ("--train.save_every=-1", [[*c, "train", demo, "--train.save_every=-1"]], "error", "train.save_every"),
        ("--optim.warmup_steps=-10", [[*c, "train", demo, "--optim.warmup_steps=-10"]], "error", "warmup_steps"),
        ("--optim.grad_clip=-1", [[*c, "train", demo, "--optim.grad_clip=-1"]], "error", "optim.grad_clip"),
        ("--train.keep_checkpoints=-1", [[*c, "train", demo, "--train.keep_checkpoints=-1"]], "error", "keep_"),
        ("--data.eval_batches=0", [[*c, "train", demo, "--data.eval_batches=0"]], "error", "data.eval_batches"),
        ("--optim.weight_decay=-1", [[*c, "train", demo, "--optim.weight_decay=-1"]], "error", "weight_decay"),
        ("--data.max_target_len=1", [[*c, "train", demo, "--data.max_target_len=1"]], "error", "max_target_len"),
        ("--train.threads=-2", [[*c, "train", demo, "--train.threads=-2"]], "error", "train.threads"),
        ("--optim.lr=-0.01", [[*c, "train", demo, "--optim.lr=-0.01"]], "error", "optim.lr must be >= 0"),
        ("--train.seed=-1", [[*c, "train", demo, "--train.seed=-1"]], "error", "train.seed"),
        ("init_from typo", [[*c, "train", demo, "--model.init_from=runs/a/fnal"]], "error", "not a local folder"),
        (
            "init_from a hub name, HF_HUB_OFFLINE=0",
            [["env", "HF_HUB_OFFLINE=0", *c, "train", demo, "--model.init_from=flan-t5-small"]],
            "error",
            "nothing is downloaded",
        ),  # fmt: skip
        (
            "data.tokenizer an empty folder",
            [[*c, "train", demo, f"--data.tokenizer={t}/emptytok"]],
            "error",
            "holds no tokenizer files",
        ),
        (
            "glob in data.corpus",
            [[*c, "train", demo, *tiny, f"--train.out_dir={t}/glob", "--data.corpus=[data/corpus/kjv_train*.gz]"]],
            "ok",
            "",
        ),  # fmt: skip
        (
            "glob in pretokenize",
            [
                [
                    *c,
                    "pretokenize",
                    "data/corpus/kjv_held*.gz",
                    "--tokenizer",
                    "runs/tok",
                    "--out",
                    f"{t}/gl",
                    "--no-progress",
                ]
            ],
            "ok",
            "wrote",
        ),  # fmt: skip
        (
            "pretokenize --tokenizer a weights-only T5 folder",
            [[*c, "pretokenize", "data/corpus/kjv_heldout.txt.gz", "--tokenizer", f"{t}/hf_t5", "--out", f"{t}/unk"]],
            "error",
            "holds no tokenizer files",
        ),  # fmt: skip
        (
            "generate a weights-only T5 folder",
            [[*c, "generate", f"{t}/hf_t5", "translate English to German: hi"]],
            "error",
            "pass --tokenizer",
        ),
        ("generate a checkpoints/step-N folder", [[*c, "generate", str(ckpt), "hello"]], "error", "--tokenizer"),
        ("generate --num-beams 0", [[*c, "generate", "runs/a/final", "hi", "--num-beams", "0"]], "error", "beams"),
        ("generate --device gpu", [[*c, "generate", "runs/a/final", "hi", "--device", "gpu"]], "error", "--device"),
        (
            "generate prints only the output",
            [[*c, "generate", "runs/a/final", "hi", "--max-new-tokens", "3"]],
            "ok",
            "",
        ),
        (
            "convert X X --to hf (in place)",
            [[*c, "convert", f"{t}/inplace", f"{t}/inplace", "--to", "hf"]],
            "ok",
            "wrote hf",
        ),
        ("convert a BERT folder", [[*c, "convert", f"{t}/bert", f"{t}/o1"]], "error", "not a T5 checkpoint"),
        ("convert, no model_type", [[*c, "convert", f"{t}/notype", f"{t}/o2"]], "error", "not a T5 checkpoint"),
        (
            "convert, half-written config.json",
            [[*c, "convert", f"{t}/halfjson", f"{t}/o3"]],
            "error",
            "config.json is not valid JSON",
        ),
        (
            "convert, truncated safetensors",
            [[*c, "convert", f"{t}/trunc", f"{t}/o4"]],
            "error",
            "trunc/model.safetensors",
        ),
        (
            "convert, index escaping the folder",
            [[*c, "convert", f"{t}/escape", f"{t}/o5"]],
            "error",
            "not a file name inside",
        ),
        (
            "convert, symlinked tokenizer.json to a secret",
            [[*c, "convert", f"{t}/link", f"{t}/o6"]],
            "ok",
            "not copying",
        ),
        (
            "convert into an earlier sharded export",
            [[*c, "convert", "runs/a/final", f"{t}/stale", "--to", "hf"]],
            "ok",
            "wrote hf",
        ),
        (
            "pretokenize --out a file",
            [[*c, "pretokenize", f"{t}/e.txt", "--tokenizer", "runs/tok", "--out", f"{t}/file"]],
            "error",
            "is a file",
        ),  # fmt: skip
        (
            "tokenizer train --out a file",
            [[*c, "tokenizer", "train", f"{t}/e.txt", "--out", f"{t}/file"]],
            "error",
            "is a file",
        ),
        (
            "tokenizer with 0 sentinels, then train",
            [
                [
                    *c,
                    "tokenizer",
                    "train",
                    "data/corpus/kjv_heldout.txt.gz",
                    "--out",
                    f"{t}/tok0",
                    "--vocab-size",
                    "300",
                    "--num-sentinels",
                    "0",
                ],
                [*c, "train", demo, f"--data.tokenizer={t}/tok0"],
            ],
            "error",
            "has no <extra_id_N> sentinels",
        ),  # fmt: skip
        (
            "input edited in place, same size",
            [
                [*c, "pretokenize", f"{t}/e.txt", "--tokenizer", "runs/tok", "--out", f"{t}/est", "--no-progress"],
                ["sh", "-c", f"printf 'THE FIRST DOCUMENT\\nthe second document\\n' > {t}/e.txt"],
                [*c, "pretokenize", f"{t}/e.txt", "--tokenizer", "runs/tok", "--out", f"{t}/est", "--no-progress"],
            ],
            "error",
            "changed since the store was made",
        ),  # fmt: skip
        (
            "store cut short under a complete meta.json",
            [
                [
                    *c,
                    "pretokenize",
                    "data/corpus/kjv_heldout.txt.gz",
                    "--tokenizer",
                    "runs/tok",
                    "--out",
                    f"{t}/cut",
                    "--no-progress",
                ],
                ["truncate", "-s", "1000", f"{t}/cut/tokens.bin"],
                [*c, "pretokenize", "data/corpus/kjv_heldout.txt.gz", "--tokenizer", "runs/tok", "--out", f"{t}/cut"],
            ],
            "error",
            "not a complete token store",
        ),  # fmt: skip
        (
            "invalid UTF-8 in the corpus of train",
            [
                [
                    *c,
                    "train",
                    demo,
                    *tiny,
                    f"--train.out_dir={t}/u",
                    f"--data.corpus=[{t}/bad_utf8.txt]",
                    f"--data.store={t}/ustore",
                ]
            ],
            "error",
            "pretokenize the corpus",
        ),
        (
            "from_pretrained('runs/nonexistent') (Python API)",
            [
                [
                    sys.executable,
                    "-c",
                    "from flasht5 import FlashT5ForConditionalGeneration as M; M.from_pretrained('runs/nonexistent')",
                ]
            ],
            "error",
            "nothing is downloaded",
        ),  # fmt: skip
    ]
    rows = []
    for name, cmds, expect, must in cases:
        t0 = time.perf_counter()
        for cmd in cmds:
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
        text = res.stdout + res.stderr
        # The Python API raises: a traceback whose last line names the problem is the clear error there.
        tb = "Traceback" in text and not (name.endswith("(Python API)") and must in text.strip().splitlines()[-1])
        if expect == "ok":
            verdict = "OK" if res.returncode == 0 and must in text and not tb else "FAIL"
        else:
            verdict = "CE" if res.returncode != 0 and not tb and must in text else ("CR" if res.returncode else "SW")
        noise = [w for w in ("Loading weights", "Writing model shards", "to instantiate a model of type") if w in text]
        row = {"case": name, "verdict": verdict, "rc": res.returncode, "s": round(time.perf_counter() - t0, 1),
               "noise": noise, "said": [ln for ln in text.strip().splitlines() if ln.strip()][-1:]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["kill", "concurrent", "trains", "cli"])
    p.add_argument("--chains", type=int, default=10)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=14.0, help="kill: latest kill, seconds after the start")
    a = p.parse_args()
    if a.what == "kill":
        kill(a.chains, a.seed, a.max_delay)
    elif a.what == "concurrent":
        concurrent(a.trials, a.seed)
    elif a.what == "trains":
        trains(a.trials, a.seed)
    else:
        cli_cases()
    return 0


if __name__ == "__main__":
    sys.exit(main())
