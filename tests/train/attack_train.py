"""Fault injection against `flasht5 train` (not collected by pytest): kill -9 at random points during training and
during checkpoint saves, Ctrl-C, two runs on one folder, damaged checkpoints, a full disk; every resumed run is
compared with an uninterrupted one (each metrics row but the timing fields, and the final weights, bit for bit).

    python tests/train/attack_train.py all --work /tmp/flasht5-attack      # about 25 min on 2 CPU cores
    python tests/train/attack_train.py train 20 | save 20 | sigint 8 | workers 6 | race | cases | fulldisk

Prints one JSON line per case. The tiny run (60 steps, dropout 0.1, log_every 3 and save_every 4 so that resume
points fall inside log windows) is the one docs/reliability.md reports. `fulldisk` needs root (a tmpfs in a private
mount namespace, via unshare).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
TIMING = ("tokens_per_s", "graphed")  # the only fields of a metrics row that differ between identical runs
WORK = Path("/tmp/flasht5-attack")


def tiny(work: Path) -> list[str]:
    return [
        "configs/pretrain/demo.yaml", f"--data.tokenizer={work}/tok", "--data.vocab_size=400",
        "--data.tokenizer_sample=2000", "--data.max_tokens=256", "--data.max_input_len=64", "--data.max_target_len=16",
        "--data.eval_batches=1",
        "--model.overrides={d_model: 32, d_kv: 16, d_ff: 64, num_layers: 1, num_heads: 2, dropout_rate: 0.1}",
        "--optim.warmup_steps=5", "--train.eval_every=10", "--train.log_every=3", "--train.save_every=4",
        "--train.keep_checkpoints=2", "--train.samples=0", "--train.progress=false", "--train.device=cpu",
        "--train.threads=1", "--train.steps=60",
    ]  # fmt: skip


def command(out: Path, *extra: str, store: bool = True, resume: bool = True) -> list[str]:
    args = [sys.executable, "-m", "flasht5.cli", "train", *tiny(WORK), f"--train.out_dir={out}"]
    args += [f"--train.resume={str(resume).lower()}", *extra]
    return args + ([f"--data.store={WORK}/store"] if store else [])


def start(out: Path, *extra: str, store: bool = True) -> subprocess.Popen:
    with open(f"{out}.log", "a") as log:  # the child keeps its own descriptor
        log.write(f"\n=== {time.strftime('%X')} {' '.join(extra)}\n")
        log.flush()
        cmd = command(out, *extra, store=store)
        # A shell without job control starts background jobs with SIGINT ignored, and children inherit that:
        # restore the default so that Ctrl-C (SIGINT) reaches the run as KeyboardInterrupt.
        dfl = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, preexec_fn=dfl)


def run(out: Path, *extra: str, resume: bool = True) -> tuple[int, str]:
    p = subprocess.run(command(out, *extra, resume=resume), capture_output=True, text=True, env=ENV, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


def rows(out: Path) -> list[dict]:
    p = Path(out) / "metrics.jsonl"
    lines = p.read_text().splitlines() if p.exists() else []
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def compare(out: Path, ref: Path) -> dict:
    from safetensors.torch import load_file

    r = rows(out)
    wa, wb = (load_file(str(Path(d) / "final" / "model.safetensors")) for d in (out, ref))
    return {
        "curve_equal": r == rows(ref),
        "duplicate_rows": len(r) - len({(x["step"], "eval_loss" in x) for x in r}),
        "weights_equal": wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa),
    }


def emit(case: dict) -> dict:
    print(json.dumps(case), flush=True)
    return case


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    Path(f"{path}.log").unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------------


def setup() -> None:
    """The tokenizer, the store and the uninterrupted reference runs (0 and 2 data workers)."""
    WORK.mkdir(parents=True, exist_ok=True)
    for name, extra in (("ref", ()), ("ref-workers", ("--data.num_workers=2",))):
        if not (WORK / name / "final").exists():
            rc, text = run(fresh(WORK / name), *extra, resume=False)
            assert rc == 0, text[-3000:]


def _since(out: Path, offset: int) -> str:
    with open(f"{out}.log") as f:
        f.seek(offset)
        return f.read()


def _tmp_exists(out: Path) -> bool:
    try:
        return any(e.name.endswith(".tmp") for e in os.scandir(out / "checkpoints")) or (out / "final.tmp").exists()
    except FileNotFoundError:
        return False


def crashes(log: str) -> int:
    """Attempts whose traceback ends in anything but KeyboardInterrupt (Ctrl-C prints one, chained or not)."""
    n = 0
    for attempt in log.split("\n=== "):
        if "Traceback" in attempt:
            last = [ln for ln in attempt.splitlines() if re.match(r"^[A-Za-z_.]+(Error|Exception|Interrupt)\b", ln)]
            n += not (last and last[-1].startswith("KeyboardInterrupt"))
    return n


def kill_series(out: Path, n_kills: int, how: str, extra: tuple[str, ...], ref: Path) -> dict:
    """Restart (always with resume) until the run finishes, interrupting each attempt until n_kills: ``train``: kill
    -9 at a random moment of training; ``save``: let 0-5 saves pass, kill -9 0-20 ms into the next one; ``sigint``."""
    kills, attempts, unexpected, left = 0, 0, [], 0
    while True:
        attempts += 1
        offset = Path(f"{out}.log").stat().st_size if Path(f"{out}.log").exists() else 0
        p = start(out, *extra)
        if kills < n_kills:
            t0 = time.monotonic()  # this attempt got through set-up:
            while p.poll() is None and time.monotonic() - t0 < 300:
                said = _since(out, offset)
                if "resumed from" in said or "held-out loss at step 0" in said:
                    break
                time.sleep(0.01)
            if how == "save":
                delay, skip = random.uniform(0, 0.02), random.randint(0, 5)
                for i in range(skip + 1):
                    while p.poll() is None and not _tmp_exists(out):
                        pass
                    while i < skip and p.poll() is None and _tmp_exists(out):
                        pass
                time.sleep(delay)
            else:
                time.sleep(random.uniform(0, 2.5))
            if p.poll() is None:
                p.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
                kills += 1
        rc = p.wait()
        left += _tmp_exists(out)
        if rc == 0:
            if attempts == kills:  # the signal came after the run had finished
                kills -= 1
            break
        if rc not in ((-9,) if how != "sigint" else (-9, -2, 1, 130)):
            unexpected.append(rc)
            if len(unexpected) > 2:
                break
    log = Path(f"{out}.log").read_text()
    tracebacks = crashes(log)
    return {"case": out.name, "how": how, "kills": kills, "attempts": attempts, "unexpected_exits": unexpected,
            "tmp_left_by_kills": left, "cleanups_logged": log.count("cleaned up after an interrupted save"),
            "other_tracebacks": tracebacks, **compare(out, ref)}  # fmt: skip


def kills(how: str, n: int, workers: bool = False) -> list[dict]:
    """Series of runs until n interruptions in all (a run that finishes ends its series)."""
    extra, ref = (("--data.num_workers=2",), WORK / "ref-workers") if workers else ((), WORK / "ref")
    done, i, cases = 0, 0, []
    while done < n and i < 3 * n:  # (bounded: a signal that never lands ends the attack)
        out = fresh(WORK / f"kill-{how}{'-w' if workers else ''}-{i}")
        cases.append(emit(kill_series(out, n - done, how, extra, ref)))
        done += cases[-1]["kills"]
        i += 1
    return cases


def race(delays: tuple = ("training", "saving", 0, 0.05, 0.2, 1, 3)) -> list[dict]:
    """Two runs on one fresh out_dir (each would pretokenize into <out_dir>/store), the second started `delay` s
    later, or once the first is training, or while it saves a checkpoint."""
    from flasht5.data.store import TokenStore

    cases = []
    for d in delays:
        out = fresh(WORK / f"race-{d}")
        # started mid-run: 300 steps, so that the first is still running when the second is through its imports
        extra = ("--train.steps=300",) if isinstance(d, str) else ()
        a = start(out, *extra, store=False)
        if isinstance(d, str):
            while a.poll() is None and "held-out loss at step 0" not in Path(f"{out}.log").read_text():
                time.sleep(0.01)
            while d == "saving" and a.poll() is None and not _tmp_exists(out):
                pass
        else:
            time.sleep(d)
        b = start(out, *extra, store=False)
        rb, ra = b.wait(), a.wait()
        log = Path(f"{out}.log").read_text()
        refused = [ln for ln in log.splitlines() if "in use by another flasht5 run" in ln]
        winner = a if ra == 0 else b
        # a mid-run race has no uninterrupted 300-step reference: its own curve is checked for duplicates only
        cmp = compare(out, WORK / "ref") if not extra else {"duplicate_rows": compare(out, out)["duplicate_rows"]}
        case = {"case": f"race {d}{'' if isinstance(d, str) else ' s'}", "rc": [ra, rb],
                "b_ran_after_a_finished": "nothing to train" in log, "refusal": refused[0][:200] if refused else None,
                "names_winner_pid": bool(refused) and f"pid {winner.pid}" in refused[0],
                "store_docs": len(TokenStore(out / "store")), "ref_store_docs": len(TokenStore(WORK / "store")),
                **cmp}  # fmt: skip
        cases.append(emit(case))
    return cases


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {WORK}/PWNED",))


def cases() -> list[dict]:
    """The report's A10-A24 and H1 for the training folder, one run each."""
    import torch

    ref, out_ = WORK / "ref", []

    def copy(name: str) -> Path:
        out = fresh(WORK / "cases" / name)
        shutil.copytree(ref, out, ignore=shutil.ignore_patterns(".lock"))
        return out

    def said(text: str) -> str:
        lines = [ln for ln in text.splitlines() if "error" in ln.lower() or "warning" in ln.lower()]
        return (lines[-1] if lines else text.strip().splitlines()[-1])[:300]

    def case(name: str, ok: bool, verdict: str, rc: int, text: str, **kw) -> None:
        out_.append(emit({"case": name, "verdict": verdict if ok else "FAIL", "rc": rc, "said": said(text), **kw}))

    out = fresh(WORK / "cases" / "a10")
    (out / "checkpoints" / "step-0000009.tmp").mkdir(parents=True)
    rc, text = run(out, resume=False)
    ok = rc == 0 and not (out / "checkpoints" / "step-0000009.tmp").exists() and compare(out, ref)["curve_equal"]
    case("A10 stale step-N.tmp, fresh run", ok, "OK", rc, text)

    out = copy("a11")
    (out / "checkpoints" / "step-best").mkdir()
    rc, text = run(out, "--train.steps=64")
    case("A11 stray checkpoints/step-best, resume", rc == 0, "OK", rc, text)

    out = copy("a14")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc, text = run(out, "--train.steps=15", "--optim.lr=0.005", resume=False)
    kept = all((out / n).read_bytes() == b for n, b in before.items())
    kept = kept and len(list((out / "checkpoints").iterdir())) == 2
    case("A14 second run without resume in a used folder", rc == 2 and kept, "CE", rc, text)

    out = copy("a16")
    rc, text = run(out, "--train.steps=50")
    case("A16 resume with train.steps below the checkpoint", rc == 2, "CE", rc, text)

    out = copy("done")
    rc, text = run(out)
    case("resume a finished run, same steps", rc == 0 and "nothing to train" in text, "OK", rc, text)

    damages = [
        ("A20 truncated model.safetensors", "w"),
        ("A21 truncated trainer.pt", "t"),
        ("A22 missing trainer.pt", "m"),
        ("H1 code in trainer.pt", "p"),
        ("random bytes as weights", "r"),
    ]
    for name, damage in damages:  # fmt: skip
        out = copy("damage-" + damage)
        newest = sorted((out / "checkpoints").iterdir())[-1]
        shutil.rmtree(out / "final")
        if damage == "w":
            os.truncate(newest / "model.safetensors", 10000)
        elif damage == "t":
            os.truncate(newest / "trainer.pt", 10000)
        elif damage == "m":
            (newest / "trainer.pt").unlink()
        elif damage == "r":
            (newest / "model.safetensors").write_bytes(os.urandom(20000))
        else:
            s = torch.load(newest / "trainer.pt", weights_only=True)
            s["x"] = _Evil()
            torch.save(s, newest / "trainer.pt")
        rc, text = run(out)
        cmp = compare(out, ref)
        ok = rc == 0 and f"checkpoint {newest} is unreadable" in text and cmp["curve_equal"] and cmp["weights_equal"]
        case(name, ok and not (WORK / "PWNED").exists(), "OK", rc, text.split("is unreadable (")[-1], **cmp)

    out = copy("a24")
    before = (out / "config.json").read_bytes()
    rc, text = run(out, "--train.device=cuda", "--optim.lr=0.5")
    same = (out / "config.json").read_bytes() == before
    case("A24 a failing start keeps config.json", rc == 2 and same, "CE", rc, text)

    out = copy("lr")
    rc, text = run(out, "--train.steps=64", "--optim.lr=0.01")
    case("resume with another lr is reported", rc == 0 and "optim.lr: 0.02 -> 0.01" in text, "OK", rc, text)

    out = copy("a17")
    over = "--model.overrides={d_model: 32, d_kv: 16, d_ff: 96, num_layers: 1, num_heads: 2, dropout_rate: 0.1}"
    rc, text = run(out, "--train.steps=64", over)
    case("A17 resume with other model dims", rc == 2 and "Traceback" not in text, "CE", rc, text)
    return out_


def fulldisk(sizes=("1500k", "2150k", "2250k")) -> list[dict]:
    """out_dir on a small tmpfs: a clear "no space left", nothing half-written; then the tmpfs grown and resumed."""
    if os.environ.get("_ATTACK_IN_NS") != "1":
        env = dict(os.environ, _ATTACK_IN_NS="1")
        cmd = ["unshare", "-m", sys.executable, __file__, "fulldisk", "--work", str(WORK)]
        return [subprocess.run(cmd, env=env, check=False).returncode]
    out_ = []
    for size in sizes:
        mnt = WORK / f"full-{size}"
        mnt.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
        try:
            rc1, text1 = run(mnt / "run")
            left = sorted(p.name for p in (mnt / "run" / "checkpoints").iterdir())
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
            rc2, text2 = run(mnt / "run")
            err = [ln for ln in text1.splitlines() if "error" in ln]
            out_.append(emit({"case": f"full disk {size}", "rc": [rc1, rc2], "said": err[-1][:300] if err else None,
                              "left": left, "traceback": "Traceback" in text1 + text2,
                              **compare(mnt / "run", WORK / "ref")}))  # fmt: skip
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    return out_


def main() -> None:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["all", "setup", "train", "save", "sigint", "workers", "race", "cases", "fulldisk"])
    ap.add_argument("n", nargs="?", type=int, default=20)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    WORK = args.work.resolve()
    random.seed(args.seed)
    if args.what != "fulldisk" or os.environ.get("_ATTACK_IN_NS") != "1":
        setup()
    if args.what in ("train", "save", "sigint"):
        kills(args.what, args.n)
    elif args.what == "workers":
        kills("train", args.n, workers=True)
    elif args.what in ("race", "cases", "fulldisk"):
        globals()[args.what]()
    elif args.what == "all":
        kills("train", 20), kills("save", 20), kills("sigint", 8), kills("train", 6, workers=True)
        race(), cases(), fulldisk()


if __name__ == "__main__":
    main()
