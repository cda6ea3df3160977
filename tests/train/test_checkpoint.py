"""A training run's state on disk (src/flasht5/train/checkpoint.py and its use in loop.py): the out_dir lock,
atomic and durable checkpoints, the fallback from a corrupt one, refusing a used folder, config differences on
resume, weights-only trainer state, and resume that is exact with dropout.

Each test reproduces a defect of the 2026-12-01 reliability report (D1-D4, D7, D12-D14) on a tiny CPU run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flasht5.train import checkpoint as ckpt
from flasht5.train.config import load_config

DEMO = "configs/pretrain/demo.yaml"
TINY = "{d_model: 32, d_kv: 16, d_ff: 64, num_layers: 1, num_heads: 2, dropout_rate: 0.1}"
TIMING = ("tokens_per_s", "graphed")  # the only fields of a metrics row that may differ between identical runs


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A tokenizer and token stores built once for the module (every run here reuses them)."""
    return tmp_path_factory.mktemp("shared")


def _cfg(shared: Path, out: Path, steps: int, *extra: str):
    return load_config(
        DEMO,
        [
            f"--train.out_dir={out}", f"--data.tokenizer={shared / 'tok'}", f"--data.store={shared / 'store'}",
            f"--train.steps={steps}", "--data.vocab_size=400", "--data.tokenizer_sample=2000",
            "--data.max_tokens=256", "--data.max_input_len=64", "--data.max_target_len=16", "--data.eval_batches=1",
            f"--model.overrides={TINY}", "--optim.warmup_steps=2", "--train.eval_every=5", "--train.log_every=3",
            "--train.save_every=4", "--train.keep_checkpoints=3", "--train.samples=0", "--train.progress=false",
            "--train.device=cpu", *extra,
        ],
    )  # fmt: skip


def _run(shared: Path, out: Path, steps: int, *extra: str) -> dict:
    from flasht5.train.loop import train

    return train(_cfg(shared, out, steps, *extra))


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


class Stop(Exception):
    pass


def _stop_after(monkeypatch, n_steps: int) -> None:
    """Interrupt the run (as Ctrl-C would) when it has trained ``n_steps`` steps."""
    import flasht5.train.loop as loop

    class Stopping(loop.TrainStep):
        def __call__(self, batch):
            if self.steps == n_steps:
                raise Stop
            return super().__call__(batch)

    monkeypatch.setattr(loop, "TrainStep", Stopping)


@pytest.fixture(scope="module")
def finished(shared) -> Path:
    """An uninterrupted 10-step run with dropout 0.1: checkpoints at 4, 8, 10 and final/."""
    out = shared / "finished"
    _run(shared, out, 10)
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


# ---------------------------------------------------------------------------------------------------------------
# D7 + D14: resume is exact with dropout; the curve has no duplicates
# ---------------------------------------------------------------------------------------------------------------


def test_stopped_and_resumed_run_reproduces_uninterrupted_run_bit_for_bit(shared, finished, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_after(m, 7)  # checkpoint at 4; rows at 3 and 6 and the eval at 5 written after it
        with pytest.raises(Stop):
            _run(shared, out, 10)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000004"]
    assert max(r["step"] for r in _rows(out)) == 6
    resumed = _run(shared, out, 10, "--train.resume=true")
    # Every row equal (loss, lr, grad norm, held-out loss, data counts), none twice; final weights bit-identical.
    # The row at step 6 averages steps 4-6 (log_every 3): step 4's loss comes from the checkpoint.
    assert _rows(out) == _rows(finished)
    for a, b in zip(_weights(out / "final").values(), _weights(finished / "final").values()):
        assert torch.equal(a, b)
    uninterrupted = json.loads((finished / "summary.json").read_text())
    assert resumed["initial_eval_loss"] == uninterrupted["initial_eval_loss"]  # the step-0 eval, not the resume's
    assert resumed["final_eval_loss"] == uninterrupted["final_eval_loss"]
    assert resumed["final_train_loss"] == uninterrupted["final_train_loss"]


def test_resume_is_exact_with_dropout_and_data_workers(shared, tmp_path, monkeypatch):
    # With workers, the DataLoader draws its workers' base seed; from the global generator that would shift a resumed
    # run's dropout masks by one draw.
    workers = ("--data.num_workers=2",)
    _run(shared, tmp_path / "straight", 6, *workers)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_after(m, 5)
        with pytest.raises(Stop):
            _run(shared, out, 6, *workers)
    _run(shared, out, 6, "--train.resume=true", *workers)
    assert _rows(out) == _rows(tmp_path / "straight")


def test_resume_past_train_steps_is_refused_and_at_train_steps_trains_nothing(shared, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    with pytest.raises(ckpt.RunDirError, match=r"step-0000010 is at step 10, past train.steps=6"):
        _run(shared, out, 6, "--train.resume=true")
    rows = _rows(out)
    summary = _run(shared, out, 10, "--train.resume=true")
    assert "nothing to train" in capsys.readouterr().out
    assert summary["steps"] == 10 and _rows(out) == rows


# ---------------------------------------------------------------------------------------------------------------
# D1: one run per out_dir
# ---------------------------------------------------------------------------------------------------------------


def test_second_run_on_a_locked_out_dir_is_refused_at_once_naming_folder_and_pid(shared, tmp_path):
    out = tmp_path / "run"
    with ckpt.RunLock(out):
        with pytest.raises(ckpt.RunDirError, match=rf"{out}.*in use by another flasht5 run \(pid {os.getpid()}"):
            _run(shared, out, 4)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # refused before it wrote anything
    with ckpt.RunLock(out):  # released on exit
        pass


_HOLD = textwrap.dedent(
    """
    import os, sys, time
    from flasht5.train.checkpoint import RunLock
    lock = RunLock(sys.argv[1]).__enter__()
    r, w = os.pipe()
    child = os.fork() if sys.argv[2] == "fork" else -1  # a forked child, as a DataLoader worker is
    if child == 0:
        os.write(w, b"x")  # the at-fork hook has run in this child (a loaded machine may schedule it late)
        time.sleep(60)
        os._exit(0)
    if child > 0:
        os.read(r, 1)
    print(child, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("mode", ["plain", "fork"])
def test_a_killed_runs_lock_does_not_block(tmp_path, mode):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(ckpt.__file__).parents[2]))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), mode], stdout=subprocess.PIPE, env=env)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ckpt.RunDirError, match=rf"pid {holder.pid}\b"):
            ckpt.RunLock(out).__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with ckpt.RunLock(out):  # at once, although the killed run's forked child still runs
            assert (out / ".lock").read_text().split()[0] == str(os.getpid())
            if child > 0:
                os.kill(child, 0)  # (still alive)
    finally:
        holder.kill()
        if child > 0:
            os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# D2: interrupted saves never block; only step-N names count
# ---------------------------------------------------------------------------------------------------------------


def test_interrupted_saves_and_stray_folders_do_not_block_a_run(shared, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    for name in ("step-0000011.tmp", "step-0000003.del", "step-best", "step-12x"):
        (out / "checkpoints" / name).mkdir()
    (out / "final.tmp").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-0000004", "step-0000008", "step-0000010"]
    summary = _run(shared, out, 12, "--train.resume=true", "--train.save_every=1", "--train.keep_checkpoints=2")
    assert summary["steps"] == 12
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0000011", "step-0000012", "step-12x", "step-best"]  # stale ones removed, strays kept
    assert not (out / "final.tmp").exists()


def test_a_save_killed_while_replacing_a_folder_gets_the_complete_one_back(tmp_path):
    ckdir = tmp_path / "checkpoints"
    for name in ("final.old", "checkpoints/step-0000005.old", "checkpoints/step-0000005", "checkpoints/step-6.tmp"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "model.safetensors").write_text(name)
    ckpt.remove_interrupted_saves(tmp_path)
    # killed between "final -> final.old" and "final.tmp -> final": the old, complete final/ is put back
    assert (tmp_path / "final" / "model.safetensors").read_text() == "final.old"
    # killed after the new step-5 took its name: the old copy goes
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-0000005"]
    assert (ckdir / "step-0000005" / "model.safetensors").read_text() == "checkpoints/step-0000005"


# ---------------------------------------------------------------------------------------------------------------
# D12: durable writes; a full disk says so and leaves nothing half-written
# ---------------------------------------------------------------------------------------------------------------


class _FakeModel:
    def __init__(self, fail: BaseException | None = None):
        self.fail = fail

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"x" * 100)
        (Path(folder) / "config.json").write_text("{}")
        if self.fail is not None:
            raise self.fail

    def state_dict(self):
        return {"w": torch.zeros(25)}


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                      real_fsync(fd))[1])  # fmt: skip
    monkeypatch.setattr(Path, "rename", lambda self, dst: (events.append(("rename", str(self))),
                                                           real_rename(self, dst))[1])  # fmt: skip
    path = ckpt.save_checkpoint(tmp_path, 5, _FakeModel(), {"step": 5, "optimizer": {}}, keep=2)
    tmp = str(path) + ".tmp"
    renamed = events.index(("rename", tmp))
    synced = {p for kind, p in events[:renamed] if kind == "fsync"}
    assert {f"{tmp}/model.safetensors", f"{tmp}/config.json", f"{tmp}/trainer.pt", tmp} <= synced
    assert ("fsync", str(path.parent)) in events[renamed:]  # the rename itself is made durable
    assert torch.load(path / "trainer.pt", weights_only=True) == {"step": 5, "optimizer": {}}


@pytest.mark.parametrize(
    "fail",
    [
        OSError(errno.ENOSPC, "No space left on device"),  # what Python file writes raise
        "torch.save",  # torch.save: "unexpected pos", the ENOSPC only in the context
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    ],
)
def test_a_full_disk_says_no_space_left_and_leaves_no_half_checkpoint(tmp_path, fail):
    good = ckpt.save_checkpoint(tmp_path, 4, _FakeModel(), {"step": 4, "optimizer": {}}, keep=2)
    if fail == "torch.save":
        fail = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        fail.__context__ = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ckpt.RunDirError, match=r"no space left on device to write .*step-0000008"):
        ckpt.save_checkpoint(tmp_path, 8, _FakeModel(fail), {"step": 8, "optimizer": {}}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004"]
    assert (good / "trainer.pt").is_file()


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 50, 50))
    with pytest.raises(ckpt.RunDirError, match=r"no space left .*step-0000001 \(0.0 MiB needed"):
        ckpt.save_checkpoint(tmp_path, 1, _FakeModel(), {"step": 1, "optimizer": {}, "x": torch.zeros(100)}, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_ctrl_c_during_a_save_removes_its_tmp(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, _FakeModel(KeyboardInterrupt()), {"step": 3, "optimizer": {}}, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# D13 + D4: a corrupt or hostile newest checkpoint is named, moved aside, and the previous one used
# ---------------------------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


@pytest.mark.parametrize("damage", ["truncate weights", "truncate trainer.pt", "remove trainer.pt", "pickle"])
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(shared, finished, tmp_path, damage, capsys):
    out = _copy(finished, tmp_path / "run")
    newest = out / "checkpoints" / "step-0000010"
    if damage == "truncate weights":
        os.truncate(newest / "model.safetensors", 10000)
    elif damage == "truncate trainer.pt":
        os.truncate(newest / "trainer.pt", 1000)
    elif damage == "remove trainer.pt":
        (newest / "trainer.pt").unlink()
    else:  # D4: a crafted trainer.pt must not run code
        _Evil.marker = tmp_path / "PWNED"
        state = torch.load(newest / "trainer.pt", weights_only=True)
        state["x"] = _Evil()
        torch.save(state, newest / "trainer.pt")
    summary = _run(shared, out, 10, "--train.resume=true")
    said = capsys.readouterr().out
    assert f"checkpoint {newest} is unreadable" in said and "resuming from step-0000008" in said
    assert f"{newest / ('model.safetensors' if damage == 'truncate weights' else 'trainer.pt')}" in said
    assert "resumed from" in said and str(out / "checkpoints" / "step-0000008") in said
    assert (out / "checkpoints" / "step-0000010.corrupt").is_dir()  # kept for inspection, no longer a checkpoint
    assert summary["steps"] == 10 and not (tmp_path / "PWNED").exists()
    assert _rows(out) == _rows(finished)  # steps 9 and 10 trained again, exactly


def test_no_readable_checkpoint_is_an_error_listing_them(shared, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    for p in ckpt.list_checkpoints(out):
        os.truncate(p / "trainer.pt", 100)
    with pytest.raises(ckpt.RunDirError, match=r"no checkpoint .* reads back whole: step-0000010: .*trainer.pt"):
        _run(shared, out, 12, "--train.resume=true")
    assert len(ckpt.list_checkpoints(out)) == 3  # nothing moved when there is nothing to fall back to


def test_trainer_state_loads_weights_only_with_tensor_lr_and_device_steps(finished):
    state = torch.load(finished / "checkpoints" / "step-0000010" / "trainer.pt", weights_only=True)
    assert state["step"] == 10 and state["format"] == ckpt.FORMAT
    assert isinstance(state["rng"]["cpu"], torch.Tensor) and state["log_window"]["loss"].shape == (3,)
    steps = [s["step"] for s in state["optimizer"]["state"].values()]
    assert steps and all(isinstance(s, torch.Tensor) and s.dim() == 0 and float(s) == 10 for s in steps)
    assert json.loads(state["config"])["train"]["steps"] == 10


def test_optimizer_state_round_trips_weights_only_keeping_fp32_moments(tmp_path):
    from flasht5.train.optim import AdamWScale

    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    opt = AdamWScale([p], lr=torch.tensor(0.01))  # a 0-dim tensor lr, as the CUDA-graph step keeps it
    p.grad = torch.randn(4, 4, dtype=torch.bfloat16)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    q = torch.nn.Parameter(p.detach().clone())
    fresh = AdamWScale([q], lr=0.02)
    ckpt.load_optimizer_state(fresh, torch.load(tmp_path / "o.pt", weights_only=True), lr=0.02)
    st = fresh.state[q]
    # torch's load_state_dict would cast the moments to bf16 (the parameter's dtype)
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(st["exp_avg"], opt.state[p]["exp_avg"]) and st["step"].dtype == torch.float32
    assert fresh.param_groups[0]["lr"] == 0.02


def test_loader_state_with_workers_loads_weights_only(shared, finished, tmp_path):
    from flasht5.data.packing import ResumableLoader
    from flasht5.data.store import TokenStore
    from flasht5.data.tokenizer import load_tokenizer
    from flasht5.train.loop import make_dataset

    cfg = _cfg(shared, tmp_path / "run", 4)
    ds = make_dataset(TokenStore(shared / "store"), load_tokenizer(shared / "tok"), cfg, seed=0)
    loader = ResumableLoader(ds, num_workers=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    torch.save({"data": loader.state_dict()}, tmp_path / "t.pt")
    assert torch.load(tmp_path / "t.pt", weights_only=True)["data"] == loader.state_dict()
    del it


# ---------------------------------------------------------------------------------------------------------------
# D3: a used out_dir without resume; config differences; config.json only after set-up
# ---------------------------------------------------------------------------------------------------------------


def test_a_used_out_dir_is_refused_without_resume(shared, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in (out / "config.json", out / "metrics.jsonl")}
    with pytest.raises(ckpt.RunDirError, match=r"already holds a run .*step-0000010.*--train.resume=true"):
        _run(shared, out, 6, "--optim.lr=0.005")
    assert all(p.read_bytes() == b for p, b in before.items())
    assert len(ckpt.list_checkpoints(out)) == 3


def test_resume_into_a_folder_with_a_final_model_but_no_checkpoint_is_refused(shared, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ckpt.RunDirError, match=r"holds a finished model .* but no checkpoint to resume from"):
        _run(shared, out, 10, "--train.resume=true")


def test_a_fresh_run_replaces_the_metrics_of_a_run_that_left_no_checkpoint(shared, finished, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(finished / "metrics.jsonl", out / "metrics.jsonl")
    _run(shared, out, 10)
    assert _rows(out) == _rows(finished)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_set_up_leaves_config_json_alone(shared, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    before = (out / "config.json").read_bytes()
    with pytest.raises(ValueError, match="no CUDA device"):
        _run(shared, out, 12, "--train.resume=true", "--train.device=cuda", "--optim.lr=0.5")
    assert (out / "config.json").read_bytes() == before


def test_resume_reports_config_differences(shared, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path / "run")
    _run(shared, out, 11, "--train.resume=true", "--optim.lr=0.01")
    said = capsys.readouterr().out
    assert "differs from its own" in said and "optim.lr: 0.02 -> 0.01" in said and "train.steps: 10 -> 11" in said
    assert "train.resume" not in said and "train.out_dir" not in said  # (the copy lives in another folder)
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.01


def test_a_model_that_does_not_fit_the_checkpoint_names_it_and_the_config_difference(shared, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    other = TINY.replace("d_ff: 64", "d_ff: 96")
    with pytest.raises(ckpt.RunDirError, match=r"step-0000010 does not fit the configured model.*d_ff"):
        _run(shared, out, 12, "--train.resume=true", f"--model.overrides={other}")


def test_config_diff_and_cut_metrics_units(tmp_path):
    old = {"optim": {"lr": 0.02, "betas": [0.9, 0.999]}, "train": {"resume": False, "steps": 5}}
    new = {"optim": {"lr": 0.02, "betas": [0.9, 0.99]}, "train": {"resume": True, "steps": 5, "x": 1}}
    assert ckpt.config_diff(old, new) == ["optim.betas: [0.9, 0.999] -> [0.9, 0.99]", "train.x: '(absent)' -> 1"]
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 0, "eval_loss": 5}\n{"step": 2, "loss": 4}\n{"step": 4, "loss": 3}\n{"step": 6, "lo')
    assert ckpt.cut_metrics(m, 2) == [{"step": 0, "eval_loss": 5}, {"step": 2, "loss": 4}]
    assert m.read_text() == '{"step": 0, "eval_loss": 5}\n{"step": 2, "loss": 4}\n'
    assert ckpt.cut_metrics(m, None) == [] and m.read_text() == ""


# ---------------------------------------------------------------------------------------------------------------
# GPU: resume with the CUDA-graph step (run on the H200 through the device tool)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_resume_on_cuda_keeps_the_optimizer_state_on_the_device_and_the_curve(shared, tmp_path, monkeypatch):
    import flasht5.train.loop as loop

    cuda = ("--train.device=cuda",)
    _run(shared, tmp_path / "a", 10, *cuda)
    _run(shared, tmp_path / "b", 10, *cuda)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_after(m, 7)
        with pytest.raises(Stop):
            _run(shared, out, 10, *cuda)
    devices = []
    real = ckpt.load_optimizer_state

    def recording(optimizer, state, lr):
        real(optimizer, state, lr)
        devices.extend((k, v.device.type, v.dtype) for s in optimizer.state.values() for k, v in s.items())

    monkeypatch.setattr(loop.ckpt, "load_optimizer_state", recording)
    _run(shared, out, 10, "--train.resume=true", *cuda)
    # torch's load_state_dict would leave `step` on the CPU: inside the CUDA graph it would never advance
    assert devices and all(d == "cuda" and t == torch.float32 for _, d, t in devices), devices
    assert any(r.get("graphed") for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    if _rows(tmp_path / "a") != _rows(tmp_path / "b"):
        pytest.skip("two uninterrupted CUDA runs differ (non-deterministic kernels): exactness cannot be checked")
    assert _rows(out) == _rows(tmp_path / "a")
