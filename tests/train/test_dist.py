"""Data-parallel training (src/flasht5/train/dist.py and its use in step.py, loop.py, checkpoint.py) on the CPU:
two gloo ranks forked from the test process, a tiny fp32 model, a few steps, every test comparing numbers.

- one optimizer step of DDP on 2 ranks x B/2, of FSDP2 on 2 ranks x B/2 and of 1 process x B/2 x 2 accumulation
  steps gives the losses and weights of 1 process x B (the two halves concatenated);
- the whole loop: 2 ranks (ddp, fsdp) x grad_accum 1 == 1 process x grad_accum 2 (the same data streams);
- a 2-rank run stopped and resumed on 1 process continues the loss curve exactly, and the reverse (a 1-process
  checkpoint resumed on 2 FSDP2 ranks), across both checkpoint forms (sharded DCP and save_pretrained).

FSDP2 (``fully_shard``) runs on gloo with the pinned torch 2.13 CPU build, so it is covered here as well.
All two-rank work happens in one fork of two processes (the module fixture) to keep the file fast; the GPU tests at
the end run the same comparisons under NCCL with world size 1.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch

from flasht5.train.config import load_config

DEMO = "configs/pretrain/demo.yaml"
TINY = "{d_model: 32, d_kv: 16, d_ff: 64, num_layers: 1, num_heads: 2, dropout_rate: 0.0}"
STEPS, SAVE = 6, 3
TOL = dict(rtol=1e-5, atol=1e-5)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(shared: Path) -> Path:
    """The first 3000 lines of the shipped KJV text: a store that pretokenizes in a moment."""
    path = shared / "corpus.txt"
    if not path.exists():
        with gzip.open("data/corpus/kjv_train.txt.gz", "rt") as f:
            path.write_text("".join(line for _, line in zip(range(3000), f)))
    return path


def _cfg(shared: Path, out: Path, *extra: str):
    return load_config(
        DEMO,
        [
            f"--data.corpus=[{_corpus(shared)}]", f"--train.out_dir={out}", f"--data.tokenizer={shared / 'tok'}",
            f"--data.store={shared / 'store'}",
            f"--train.steps={STEPS}", "--data.vocab_size=300", "--data.tokenizer_sample=1500", "--data.heldout=[]",
            "--data.max_tokens=128", "--data.max_input_len=32", "--data.max_target_len=12",
            f"--model.overrides={TINY}", "--optim.warmup_steps=2", "--train.log_every=1",
            f"--train.save_every={SAVE}", "--train.keep_checkpoints=5", "--train.samples=0", "--train.progress=false",
            "--train.device=cpu", "--train.threads=1", *extra,
        ],
    )  # fmt: skip


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]


def _cut_to(src: Path, dest: Path, step: int) -> Path:
    """``src`` as a run killed after its checkpoint at ``step``: later checkpoints and the final model gone."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".lock"))
    for p in (dest / "checkpoints").iterdir():
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(dest / "final")
    return dest


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step, built by hand: the concatenated batch against its halves on ranks / accumulation steps
# ----------------------------------------------------------------------------------------------------------------


def _halves(seed: int = 0):
    """Two varlen micro-batches of different target-token counts, and their concatenation."""
    from flasht5.layout import Batch

    g = torch.Generator().manual_seed(seed)
    halves = []
    for n_docs, enc_len, dec_len in ((3, 9, 5), (2, 13, 3)):
        ids = torch.randint(3, 200, (n_docs * enc_len,), generator=g)
        labels = torch.randint(3, 200, (n_docs * dec_len,), generator=g)
        labels[::4] = -100  # ignored tokens: the weighting must count only the kept ones
        cu = torch.arange(n_docs + 1, dtype=torch.int32)
        halves.append(Batch.varlen(ids, labels, cu * enc_len, enc_len, cu * dec_len, dec_len))
    a, b = halves
    off_e, off_d = a.enc.cu_seqlens[-1], a.dec.cu_seqlens[-1]
    whole = Batch.varlen(
        torch.cat([a.input_ids, b.input_ids], 1), torch.cat([a.labels, b.labels], 1),
        torch.cat([a.enc.cu_seqlens, b.enc.cu_seqlens[1:] + off_e]), 13,
        torch.cat([a.dec.cu_seqlens, b.dec.cu_seqlens[1:] + off_d]), 5,
    )  # fmt: skip
    return halves, whole


def _core():
    from flasht5.config import FlashT5Config
    from flasht5.model import T5

    torch.manual_seed(0)
    cfg = FlashT5Config.from_preset("demo", vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    return T5(cfg)


def _steps(module, params, batches_per_step, world=None, n=3):
    from flasht5.train.optim import AdamWScale
    from flasht5.train.step import TrainStep

    opt = AdamWScale(params, lr=1e-2)
    step = TrainStep(module, opt, amp_dtype=None, cuda_graph=False, world=world)
    return [step(batches_per_step) for _ in range(n)]


@functools.cache
def _reference():
    """1 process x B: (losses, weights after 3 steps)."""
    _, whole = _halves()
    core = _core()
    outs = _steps(core, core.parameters(), whole)
    return [float(o.loss) for o in outs], {k: v.detach().clone() for k, v in core.state_dict().items()}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second thread only waits (and on a loaded 2-core machine it makes the tests crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_accumulation_equals_the_whole_batch():
    ref_losses, ref_weights = _reference()
    halves, _ = _halves()
    core = _core()
    outs = _steps(core, core.parameters(), halves)
    torch.testing.assert_close([float(o.loss) for o in outs], ref_losses, **TOL)
    for k, v in core.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], **TOL)


def test_ddp_on_one_rank_is_the_plain_step_and_equals_one_process():
    """A one-rank world reduces nothing: ddp on one rank trains the model unwrapped (no gradient copies into DDP's
    buckets, no collective), inside its process group, with the no-DDP steps exactly."""
    import torch.distributed as dist

    from flasht5.train import dist as tdist

    ref_losses, ref_weights = _reference()
    _, whole = _halves()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        core = _core()
        w = tdist.World(0, 1, 0, "ddp")
        module = tdist.wrap(core, w)
        assert module is core
        outs = _steps(module, core.parameters(), whole, world=w)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close([float(o.loss) for o in outs], ref_losses, **TOL)
    for k, v in core.state_dict().items():
        torch.testing.assert_close(v, ref_weights[k], **TOL)


def _step_on_ranks(world) -> dict:
    """Rank r's part of the hand-built step test: half r of the batch, DDP and FSDP2; global losses and weights."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from flasht5.train import dist as tdist

    halves, _ = _halves()
    out = {}
    for name, strategy, shard in (("ddp", "ddp", 0), ("fsdp", "fsdp", 0), ("hsdp", "fsdp", 1)):
        w = tdist.World(world.rank, world.world_size, world.rank, strategy)
        core = _core()
        module = tdist.wrap(core, w, shard_size=shard)  # hsdp: 2 replicas of 1-rank shards (a 2-D mesh)
        outs = _steps(module, core.parameters(), halves[world.rank], world=w)
        losses = torch.stack([o.loss for o in outs])
        dist.all_reduce(losses)  # every rank returns its share of the global mean
        sd = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out[name] = (losses.tolist(), [float(o.grad_norm) for o in outs], sd)
    # dist.meta_init: a model built on the meta device, sharded, then each rank's shards allocated and initialised
    from flasht5.config import FlashT5Config
    from flasht5.model import T5

    cfg = FlashT5Config.from_preset("demo", vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    with torch.device("meta"):
        core = T5(cfg)
    tdist.wrap(core, tdist.World(world.rank, world.world_size, world.rank, "fsdp"))
    tdist.materialize(core, torch.device("cpu"), seed=0, rank=world.rank)
    out["meta"] = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The two-rank runs: one fork of two gloo processes does all of them
# ----------------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, world_size: int, port: int, shared: str, results: str) -> None:
    import torch.distributed as dist

    from flasht5.train import dist as tdist
    from flasht5.train.loop import train

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    shared_p, res = Path(shared), Path(results)
    try:
        world = tdist.World(rank, world_size, rank, "ddp")
        step = _step_on_ranks(world)
        if rank == 0:
            torch.save(step, res / "step.pt")
        train(_cfg(shared_p, shared_p / "ddp2", "--dist.strategy=ddp"))
        train(_cfg(shared_p, shared_p / "fsdp2", "--dist.strategy=fsdp"))
        # the reverse resume: a 1-process checkpoint (save_pretrained form) continued on 2 FSDP2 ranks
        # (with dist.meta_init: the shards are allocated on the meta model's wrap, the whole weights cut into them)
        meta = ("--dist.strategy=fsdp", "--dist.meta_init=true", "--train.resume=true")
        train(_cfg(shared_p, shared_p / "one-to-fsdp2", *meta))
    except BaseException:
        (res / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The runs every test below compares (folders under the returned path)."""
    import torch.multiprocessing as mp

    from flasht5.train.loop import train

    shared = tmp_path_factory.mktemp("dist")
    # 1 process x grad_accum 2: the reference curve, and the checkpoint at SAVE for the 1 -> 2 resume
    train(_cfg(shared, shared / "one", "--train.grad_accum=2", "--dist.strategy=none"))
    _cut_to(shared / "one", shared / "one-to-fsdp2", SAVE)
    results = shared / "results"
    results.mkdir()
    try:
        mp.start_processes(
            _rank_main, args=(2, _port(), str(shared), str(results)), nprocs=2, join=True, start_method="fork"
        )
    except Exception as e:
        errors = "\n".join(p.read_text() for p in sorted(results.glob("error-*.txt")))
        raise AssertionError(f"a rank failed:\n{errors or e}") from e
    # 2 ranks -> 1 process: each data-parallel run stopped after its checkpoint at SAVE, continued in one process
    for name in ("ddp2", "fsdp2"):
        _cut_to(shared / name, shared / f"{name}-to-one", SAVE)
        train(
            _cfg(
                shared, shared / f"{name}-to-one", "--train.grad_accum=2", "--dist.strategy=none", "--train.resume=true"
            )
        )
    return shared


def test_ddp_fsdp_and_hsdp_step_on_two_ranks_equals_one_process_with_the_whole_batch(runs):
    ref_losses, ref_weights = _reference()
    step = torch.load(runs / "results" / "step.pt", weights_only=True)
    for strategy in ("ddp", "fsdp", "hsdp"):
        losses, norms, weights = step[strategy]
        torch.testing.assert_close(losses, ref_losses, **TOL, msg=strategy)
        assert all(n > 0 for n in norms)
        for k, v in weights.items():
            torch.testing.assert_close(v, ref_weights[k], **TOL, msg=f"{strategy} {k}")


def test_meta_device_initialisation_draws_t5_init_into_the_shards(runs):
    """Same shapes, per-tensor spread within 25% of the ordinary init's, norms exactly 1: T5's scheme, shard-wise."""
    got = torch.load(runs / "results" / "step.pt", weights_only=True)["meta"]
    ref = _core().state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].shape == v.shape and torch.isfinite(got[k]).all(), k
        if k.endswith("norm.weight"):
            assert (got[k] == 1).all(), k
        else:
            assert abs(got[k].std() / v.std() - 1) < 0.25, (k, got[k].std(), v.std())
            assert not torch.equal(got[k][: len(got[k]) // 2], got[k][len(got[k]) // 2 :]), k  # shards differ


@pytest.mark.parametrize("name", ["ddp2", "fsdp2"])
def test_two_ranks_train_the_curve_of_one_process_with_accumulation(runs, name):
    ref = _losses(runs / "one")
    assert len(ref) == STEPS and ref[-1] < ref[0]
    torch.testing.assert_close(_losses(runs / name), ref, **TOL)
    ckpts = sorted(p.name for p in (runs / name / "checkpoints").iterdir())
    assert ckpts == [f"step-{SAVE:07d}", f"step-{STEPS:07d}"]
    assert (runs / name / "checkpoints" / ckpts[0] / "dcp" / ".metadata").is_file()  # the sharded form
    assert (runs / name / "final" / "model.safetensors").is_file()  # rank 0's save_pretrained (gathered)


def test_final_models_of_all_strategies_agree(runs):
    from safetensors.torch import load_file

    ref = load_file(str(runs / "one" / "final" / "model.safetensors"))
    for name in ("ddp2", "fsdp2"):
        got = load_file(str(runs / name / "final" / "model.safetensors"))
        assert got.keys() == ref.keys()
        for k in ref:  # 6 Adam steps amplify reduction-order differences in rarely seen embedding rows: 1e-4
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4, msg=f"{name} {k}")


@pytest.mark.parametrize("name", ["ddp2-to-one", "fsdp2-to-one", "one-to-fsdp2"])
def test_resume_on_another_number_of_ranks_continues_the_curve(runs, name):
    """2 ranks -> 1 process (a sharded checkpoint read without a process group) and 1 process -> 2 FSDP2 ranks (a
    save_pretrained checkpoint cut into shards): the resumed curve is the uninterrupted one."""
    torch.testing.assert_close(_losses(runs / name), _losses(runs / "one"), **TOL)


def test_a_truncated_or_missing_shard_makes_the_checkpoint_unreadable(runs, tmp_path):
    """load_latest then falls back to the previous checkpoint (tests/train/test_checkpoint.py covers the fallback)."""
    from flasht5.train import checkpoint as ckpt

    run = shutil.copytree(runs / "fsdp2", tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    shard = run / "checkpoints" / f"step-{STEPS:07d}" / "dcp" / "__1_0.distcp"
    assert ckpt.read_checkpoint(shard.parent.parent).weights is None  # intact: readable, tensors loaded later
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="__1_0.distcp is truncated"):
        ckpt.read_checkpoint(shard.parent.parent)
    shard.unlink()
    with pytest.raises(ValueError, match="__1_0.distcp is missing"):
        ckpt.read_checkpoint(shard.parent.parent)
    assert ckpt.load_latest(run).step == SAVE


def test_data_state_of_another_stream_count_is_refused(runs, tmp_path):
    from flasht5.train.loop import train

    out = _cut_to(runs / "ddp2", tmp_path / "run", SAVE)  # 2 streams; one process without accumulation has 1
    with pytest.raises(ValueError, match="data streams.*train.grad_accum=2"):
        train(_cfg(runs, out, "--dist.strategy=none", "--train.resume=true"))


def test_dist_config_is_checked():
    for bad, match in (
        ("--dist.strategy=zero3", "dist.strategy"),
        ("--dist.cpu_offload=true", "fsdp only"),
        ("--train.grad_accum=0", "train.grad_accum"),
    ):
        with pytest.raises(ValueError, match=match):
            load_config(DEMO, [bad], check_paths_too=False)
    with pytest.raises(ValueError, match="torchrun"):
        from flasht5.train import dist as tdist

        if "RANK" not in os.environ:
            tdist.init("ddp", "cpu")
        else:  # pragma: no cover - the suite itself under torchrun
            raise ValueError("torchrun")


# ----------------------------------------------------------------------------------------------------------------
# GPU: the same comparisons under NCCL with world size 1 (the one-GPU machine)
# ----------------------------------------------------------------------------------------------------------------


def _nccl_main(rank: int, port: int, shared: str, strategy: str, extra: tuple) -> None:
    import torch.distributed as dist

    from flasht5.train.loop import train

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        train(_cfg(Path(shared), Path(shared) / strategy, f"--dist.strategy={strategy}", *extra))
    finally:
        dist.destroy_process_group()


BF16 = dict(rtol=2e-2, atol=2e-2)  # bf16 autocast; FSDP2 computes with bf16 weights (its mixed-precision policy)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_world_size_one_matches_a_single_process(tmp_path, strategy):
    """The eager step (no CUDA graph) under DDP / FSDP2 on 1 NCCL rank against the same run without a process group,
    then resumed from its sharded checkpoint in one process."""
    import torch.multiprocessing as mp

    from flasht5.train.loop import train

    cuda = ("--train.device=cuda", "--train.cuda_graphs=false")
    train(_cfg(tmp_path, tmp_path / "none", "--dist.strategy=none", *cuda))
    mp.start_processes(_nccl_main, args=(_port(), str(tmp_path), strategy, cuda), nprocs=1, start_method="spawn")
    torch.testing.assert_close(_losses(tmp_path / strategy), _losses(tmp_path / "none"), **BF16)
    assert (tmp_path / strategy / "checkpoints" / f"step-{SAVE:07d}" / "dcp" / ".metadata").is_file()
    _cut_to(tmp_path / strategy, tmp_path / "resumed", SAVE)
    train(_cfg(tmp_path, tmp_path / "resumed", "--dist.strategy=none", "--train.resume=true", *cuda))
    torch.testing.assert_close(_losses(tmp_path / "resumed"), _losses(tmp_path / "none"), **BF16)


@pytest.mark.gpu
def test_nccl_world_size_one_ddp_with_the_cuda_graph_step(tmp_path):
    """dist.strategy=ddp on one NCCL rank (the model unwrapped: nothing to reduce) with the whole-step CUDA graph
    trains the eager curve."""
    import torch.multiprocessing as mp

    from flasht5.train.loop import train

    cuda = ("--train.device=cuda", f"--train.steps={STEPS + 14}", f"--train.save_every={STEPS + 14}")
    train(_cfg(tmp_path, tmp_path / "none", "--dist.strategy=none", "--train.cuda_graphs=false", *cuda))
    mp.start_processes(
        _nccl_main, args=(_port(), str(tmp_path), "ddp", (*cuda, "--train.cuda_graphs=true")), nprocs=1,
        start_method="spawn",
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("graphed") for r in rows)
    torch.testing.assert_close(_losses(tmp_path / "ddp"), _losses(tmp_path / "none"), **BF16)


@pytest.mark.gpu
def test_fsdp_bf16_kahan_on_one_nccl_rank_trains(tmp_path):
    """Pure bf16 + Kahan under FSDP2 (sharded bf16 weights, Kahan buffers as DTensors, saved by DCP): it learns,
    and its checkpoint resumes in one process."""
    import torch.multiprocessing as mp

    from flasht5.train.loop import train

    extra = ("--train.device=cuda", "--optim.precision=bf16_kahan", "--train.steps=20", "--train.save_every=10")
    mp.start_processes(_nccl_main, args=(_port(), str(tmp_path), "fsdp", extra), nprocs=1, start_method="spawn")
    losses = _losses(tmp_path / "fsdp")
    assert losses[-1] < losses[0] - 0.3, losses
    _cut_to(tmp_path / "fsdp", tmp_path / "resumed", 10)
    train(_cfg(tmp_path, tmp_path / "resumed", "--dist.strategy=none", "--train.resume=true", *extra))
    torch.testing.assert_close(_losses(tmp_path / "resumed")[10:], losses[10:], **BF16)
