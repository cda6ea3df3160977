"""A training run's state on disk: the ``out_dir`` lock, checkpoints, the RNG state, and the metrics file on resume.

``out_dir`` holds::

    .lock                    fcntl.flock'ed by the run using the folder (its pid and host inside, for the message)
    config.json              the config of the last run that got through set-up
    metrics.jsonl            a JSON row per log step and per evaluation
    checkpoints/step-N/      save_pretrained weights + trainer.pt (step, optimizer, data position, RNG, log window,
                             config); N has 7 digits, only names of that form count as checkpoints
    checkpoints/step-N.tmp   a save in progress; one left by a killed run is removed at the next start
    final/                   the finished model and tokenizer

What holds, and why:

- One run per folder. The lock is an ``flock`` on ``.lock``: the kernel releases it when the holder exits, however it
  exits (kill -9 included), so a dead run never blocks the next one; the file itself is never deleted (deleting it
  would let two runs lock two different inodes).
- A checkpoint is complete or absent. It is written into ``step-N.tmp``; every file and the folder are fsynced, then
  the folder is renamed, then the parent is fsynced (the ext4/XFS recipe: without the fsyncs a power loss can leave
  a renamed but empty checkpoint). A failed save removes its ``.tmp``; a full disk says "no space left" and names
  the folder (free space is also checked before writing). Pruned checkpoints are renamed to ``step-N.del`` before
  they are deleted, so a kill during the deletion never leaves a half checkpoint under a checkpoint's name.
- Resume takes the newest checkpoint that reads back whole; an unreadable one (truncated, missing a file, not a
  weights-only pickle) is named, moved aside to ``step-N.corrupt`` and the previous one is used, with a warning.
  ``trainer.pt`` is read with ``torch.load(weights_only=True)``: nothing in it is executable.
- Resume is exact: the CPU and CUDA generators are saved with the step (dropout draws from them); the data
  position (every DataLoader worker's) is the loader's state; the last ``log_every`` losses are saved so the first
  logged mean after a resume averages the same steps; ``metrics.jsonl`` is cut back to the checkpoint's step.

Distributed runs (``dist.strategy`` ddp / fsdp, :mod:`flasht5.train.dist`) write ``checkpoints/step-N/dcp/``
instead of the ``save_pretrained`` weights: the model and the optimizer through ``torch.distributed.checkpoint``
(every rank writes its own shards in parallel, ``.metadata`` says where each piece of each tensor lies), so a
checkpoint saved on N ranks loads on any number of ranks, or in one process without a process group, with any
strategy (DCP reshards on load). ``trainer.pt`` (rank 0 writes it) then holds the step, every rank's RNG state, the
position of every data stream and the log window; the atomic rename of the folder is rank 0's, after every rank's
shards are written. Single-process runs keep the ``save_pretrained`` form; either form resumes under the other.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from flasht5.fs import fsync

FORMAT = 2  # trainer.pt layout; 1 = before the RNG state and the log window were saved
_STEP = re.compile(r"step-(\d+)")
_STALE = re.compile(r"(step-\d+|final)\.(tmp|del)")
_REPLACED = re.compile(r"(step-\d+|final)\.old")


class RunDirError(ValueError):
    """A problem with the run folder for the user to resolve; a ValueError, so the CLI prints it as one line."""


def log(msg: str) -> None:
    print(f"[flasht5] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The out_dir lock
# ----------------------------------------------------------------------------------------------------------------


def _holder(path: Path) -> tuple[int | None, str]:
    try:
        pid, _, host = path.read_text().strip().partition(" ")
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


_HELD: set[int] = set()  # lock fds held by this process


def _close_held_in_child() -> None:
    # A forked child (a DataLoader worker) shares the locked open file: were it to keep it, a killed run's lock
    # would outlive the run by as long as its workers take to notice. Closing the child's copy (not LOCK_UN, which
    # would release the parent's lock) leaves the lock to the parent alone.
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """Exclusive use of a run folder by one process: ``with RunLock(out_dir): ...``; a second run on the folder
    raises :class:`RunDirError` at once, naming the folder and the holder's pid. The kernel releases the lock when
    the holder exits however it exits; forked children do not hold it (see ``_close_held_in_child``)."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.path = self.out / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (flasht5 trains on Linux)
            return self
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot write to train.out_dir {self.out}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, host = _holder(self.path)
            where = f" on {host}" if host and host != socket.gethostname() else ""
            who = "pid unknown" if pid is None else f"pid {pid}{where}"
            raise RunDirError(
                f"train.out_dir {self.out} is in use by another flasht5 run ({who}, lock file {self.path}): "
                "wait for it to finish, or choose another train.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # releases the flock; the file stays (see the module docstring)
            self._fd = None


# ----------------------------------------------------------------------------------------------------------------
# Listing, cleaning, refusing
# ----------------------------------------------------------------------------------------------------------------


def list_checkpoints(out: Path) -> list[Path]:
    """The checkpoints ``checkpoints/step-N`` (N digits only), oldest first; anything else there is ignored."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)  # a symlinked checkpoint: drop the link, never its target
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_interrupted_saves(out: Path) -> list[str]:
    """Clean up after interrupted saves and prunes: ``step-N.tmp`` / ``final.tmp`` (a save in progress) and
    ``step-N.del`` (a prune in progress) are deleted; ``X.old`` (the complete folder a save was replacing) is put
    back when the kill came before its replacement took its name, else deleted. Returns what it touched.

    Only call this while holding the folder's :class:`RunLock`: a running save's ``.tmp`` is not stale."""
    out = Path(out)
    found = [p for d in (out / "checkpoints", out) if d.is_dir() for p in sorted(d.iterdir())]
    touched = []
    for p in found:
        if _STALE.fullmatch(p.name):
            _remove(p)
            touched.append(f"removed {p}")
        elif _REPLACED.fullmatch(p.name):
            target = p.with_name(p.name.removesuffix(".old"))
            if target.exists():
                _remove(p)
                touched.append(f"removed {p}")
            else:
                p.rename(target)
                touched.append(f"restored {target}")
    if touched:
        log(f"cleaned up after an interrupted save: {'; '.join(touched)}")
    return touched


def refuse_used_out_dir(out: Path, resume: bool) -> None:
    """Refuse a folder that holds an earlier run which this one would not continue: without ``train.resume`` one
    with checkpoints or a final model (writing into it would mix two runs: the old run's higher steps would win
    every prune and every later resume); with ``resume``, a final model but no checkpoint to resume from."""
    out = Path(out)
    ckpts = list_checkpoints(out)
    final = out / "final"
    if resume and (ckpts or not final.exists()):
        return
    if not ckpts and not final.exists():
        return
    if resume:
        raise RunDirError(
            f"train.out_dir {out} holds a finished model ({final}) but no checkpoint to resume from: choose another "
            f"train.out_dir, or delete {final} to train a new model there"
        )
    what = [f"checkpoints {'... ' if len(ckpts) > 3 else ''}{', '.join(p.name for p in ckpts[-3:])}"] if ckpts else []
    what += ["final/"] if final.exists() else []
    raise RunDirError(
        f"train.out_dir {out} already holds a run ({'; '.join(what)}) and train.resume is false: pass "
        f"--train.resume=true to continue it, choose another train.out_dir, or delete {out / 'checkpoints'} and "
        f"{final} to start over there"
    )


# ----------------------------------------------------------------------------------------------------------------
# Writing: atomic, durable, with a clear full-disk error
# ----------------------------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync(Path(dirpath) / f)
        fsync(Path(dirpath))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def nbytes(*objs: Any) -> int:
    """Bytes of every tensor in nested dicts / lists (an estimate of what saving them writes)."""
    return sum(t.numel() * t.element_size() for o in objs for t in _tensors(o))


def _no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk: torch.save reports one as ``unexpected pos`` with the
    ENOSPC ``OSError`` only in its context, safetensors inside its message."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "os error 28" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
    return False


def _free(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def no_space_error(path: Path, need: int | None = None, free: int | None = None, *, whole: bool = True) -> RunDirError:
    """ "No space left" naming ``path``; ``whole``: ``path`` is a folder written atomically (nothing of it was kept)."""
    sizes = f" ({need / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free)" if need is not None and free else ""
    kept = "; nothing half-written was kept" if whole else ""
    return RunDirError(
        f"no space left on device to write {path}{sizes}{kept}: free some space, then run again with "
        "--train.resume=true to continue from the last complete checkpoint"
    )


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a truncated mix."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_dir_atomically(path: Path, write: Callable[[Path], None], need: int = 0) -> Path:
    """``write(tmp)`` fills ``<path>.tmp``; it is fsynced and renamed to ``path`` (replacing it), so ``path`` is
    either complete or what it was before. Any failure removes the ``.tmp``; a full disk raises "no space left"."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    free = _free(parent)
    if 0 <= free < need:  # refuse before writing anything (a guess of the size; the write itself is the truth)
        raise no_space_error(path, need, free)
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException as e:  # noqa: BLE001 -- Ctrl-C too: never leave a half-written folder behind
        full = _no_space(e) or 0 <= _free(parent) < 1 << 20
        _remove(tmp)
        if full and isinstance(e, Exception):
            raise no_space_error(path) from e
        raise
    _swap_into_place(tmp, path)
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` to ``path``; a ``path`` already there becomes ``<path>.old`` for the moment of
    the swap (put back at the next start if a kill comes then, see :func:`remove_interrupted_saves`)."""
    if path.exists() or path.is_symlink():
        old = path.with_name(path.name + ".old")
        _remove(old)
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        tmp.rename(path)
    fsync(path.parent)


def save_checkpoint(out: Path, step: int, model: Any, trainer_state: dict[str, Any], keep: int) -> Path:
    """``checkpoints/step-N`` (weights + ``trainer.pt``), atomically and durably; keeps the newest ``keep``."""
    path = Path(out) / "checkpoints" / f"step-{step:07d}"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        with open(tmp / "trainer.pt", "wb") as f:  # a file object: a full disk then surfaces as ENOSPC
            torch.save(trainer_state, f)

    need = nbytes(model.state_dict(), trainer_state)
    write_dir_atomically(path, write, need=need)
    _prune(out, keep)
    return path


def _prune(out: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` step checkpoints (0: keep all); each is renamed aside first, so that an
    interrupted removal never leaves a half-deleted folder under a checkpoint's name."""
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            gone = old.with_name(old.name + ".del")
            _remove(gone)
            old.rename(gone)
            _remove(gone)


# ----------------------------------------------------------------------------------------------------------------
# Reading back, with a fallback to the previous checkpoint
# ----------------------------------------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    path: Path
    step: int
    weights: dict[str, torch.Tensor] | None  # None: a sharded checkpoint (read with load_sharded)
    trainer: dict[str, Any]


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at ``path`` holds model and optimizer as torch.distributed.checkpoint shards."""
    return (Path(path) / "dcp" / ".metadata").is_file()


def _first_line(e: BaseException) -> str:
    """A one-line reason: torch's messages run to paragraphs (and its weights-only one advises the unsafe load)."""
    import pickle

    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if isinstance(e, pickle.UnpicklingError):
        detail = next((ln for ln in lines if "unsupported" in ln.lower()), "").rstrip(".")
        return f"refused by the weights-only loader ({detail or 'not only tensors and plain values'}); not flasht5's"
    text = lines[0] if lines else ""
    if len(text) > 160 and ". " in text:
        text = text[: text.index(". ") + 1]
    return f"{type(e).__name__}: {text}"


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint whole (weights and trainer state); raises ``ValueError`` naming the file that fails."""
    from flasht5.convert import load_state_dict

    path = Path(path)
    trainer_pt = path / "trainer.pt"
    try:
        trainer = torch.load(trainer_pt, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ValueError(f"{trainer_pt} is missing") from e
    except Exception as e:  # truncated, or not a weights-only pickle
        raise ValueError(f"{trainer_pt}: {_first_line(e)}") from e
    sharded = is_sharded(path)
    if (
        not isinstance(trainer, dict)
        or not isinstance(trainer.get("step"), int)
        or ("optimizer" not in trainer and not sharded)
    ):
        raise ValueError(f"{trainer_pt}: not a flasht5 trainer state")
    step = int(_STEP.fullmatch(path.name).group(1)) if _STEP.fullmatch(path.name) else trainer["step"]
    if trainer["step"] != step:
        raise ValueError(f"{trainer_pt}: holds step {trainer['step']}, the folder says {step}")
    if sharded:  # the tensors are read by load_sharded once the model is built; here only the index is checked
        from torch.distributed.checkpoint import FileSystemReader

        try:
            meta = FileSystemReader(str(path / "dcp")).read_metadata()
        except Exception as e:
            raise ValueError(f"{path / 'dcp' / '.metadata'}: {_first_line(e)}") from e
        ends: dict[str, int] = {}  # every shard file must reach the end of the last piece the index puts in it
        for info in (getattr(meta, "storage_data", None) or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is not None:
                ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
        for rel, end in sorted(ends.items()):
            f = path / "dcp" / rel
            size = f.stat().st_size if f.is_file() else -1
            if size < end:
                raise ValueError(f"{f} is {'missing' if size < 0 else f'truncated ({size} of {end} bytes)'}")
        return Checkpoint(path, step, None, trainer)
    try:
        weights = load_state_dict(path)
    except Exception as e:
        raise ValueError(f"{_culprit(path) or path}: {_first_line(e)}") from e
    return Checkpoint(path, step, weights, trainer)


def _culprit(path: Path) -> Path | None:
    """The weight file of ``path`` that does not read back (to name it), if one of them is."""
    from safetensors import safe_open

    from flasht5.convert import weight_files

    try:
        files = weight_files(path)
    except Exception:
        return None
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as h:
                    h.keys()
            else:
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception:
            return f
    return None


def _move_aside(path: Path) -> Path:
    n, dest = 1, path.with_name(path.name + ".corrupt")
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.corrupt{n}")
    path.rename(dest)
    return dest


def load_latest(out: Path) -> Checkpoint | None:
    """The newest checkpoint that reads back whole, or None when there is none. Unreadable newer ones are named and
    moved aside (``step-N.corrupt``) with a warning; when none is readable, :class:`RunDirError` lists them all."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(out)):
        try:
            ckpt = read_checkpoint(path)
        except ValueError as e:
            bad.append((path, str(e)))
            continue
        for p, why in bad:
            dest = _move_aside(p)
            log(f"warning: checkpoint {p} is unreadable ({why}); moved it to {dest.name}, resuming from {path.name}")
        return ckpt
    if bad:
        raise RunDirError(
            f"no checkpoint in {Path(out) / 'checkpoints'} reads back whole: "
            + "; ".join(f"{p.name}: {why}" for p, why in bad)
            + ". Move them away (or set train.resume=false in another out_dir) to start over"
        )
    return None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], lr: float) -> None:
    """``optimizer.load_state_dict`` without torch's casts: it leaves ``step`` on the device it was loaded to (the
    CPU) and casts the moments to the parameter's dtype; AdamWScale keeps ``step`` as fp32 and the moments (and
    Kahan / master buffers) in the dtype it saved them in, on the parameter's device (a CPU ``step`` would freeze
    inside a CUDA graph). The learning rate is set by the loop every step: the saved
    one (maybe a device tensor) is replaced by ``lr``."""
    optimizer.load_state_dict(state)
    saved = {int(k): v for k, v in state["state"].items()}
    ids = [i for g in state["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in zip(ids, params):
        if i not in saved:
            continue
        st = optimizer.state[p]
        for k, v in saved[i].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():  # as saved (bf16 state stays bf16)
                st[k] = v.to(device=p.device, dtype=torch.float32 if k == "step" else v.dtype)
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------------------------------------------
# RNG, config, metrics
# ----------------------------------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The generators dropout draws from. Read between steps only (never inside a CUDA-graph capture)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


IGNORED_IN_DIFF = ("train.resume", "train.out_dir", "dist.strategy")  # a moved run, or one on other ranks


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["optim.lr: 0.02 -> 0.005", ...]``: the keys whose values differ (config dicts as saved in JSON)."""
    a, b = _flat(old), _flat(new)
    keys = sorted((a.keys() | b.keys()) - set(IGNORED_IN_DIFF))
    missing = object()
    return [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in keys
        if a.get(k, missing) != b.get(k, missing)
    ]


def cut_metrics(path: Path, step: int | None) -> list[dict[str, Any]]:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (the checkpoint a run resumes from) and drop the rest: those
    steps are trained again (``None``: a fresh start, drop all). A half-written last row (a kill mid-write) is
    dropped too. Returns the kept rows."""
    path = Path(path)
    if not path.exists():
        return []
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            keep = step is not None and row["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(row)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        after = "by an earlier run that left no checkpoint" if step is None else f"after step {step}"
        log(f"{path}: dropped {dropped} rows written {after} (those steps are trained again)")
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint), for ddp / fsdp runs
# ----------------------------------------------------------------------------------------------------------------


def _dcp_state(core: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name (sharded ``DTensor`` values under FSDP2): what DCP saves
    and, on load, the template it fills in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(core, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(
    out: Path, step: int, core: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any] | None,
    keep: int, world: Any,
) -> Path:  # fmt: skip
    """``checkpoints/step-N`` with ``dcp/`` (every rank's shards) and ``trainer.pt`` (rank 0's ``trainer_state``),
    complete or absent as :func:`save_checkpoint`'s. Every rank calls it (collective); ``trainer_state`` matters on
    rank 0 only."""
    import torch.distributed.checkpoint as dcp

    from flasht5.train import dist as tdist

    path = Path(out) / "checkpoints" / f"step-{step:07d}"
    tmp = path.with_name(path.name + ".tmp")
    state = _dcp_state(core, optimizer)

    def prepare() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        free = _free(path.parent)
        need = nbytes(state, trainer_state)  # replicated (DDP) tensors are written once
        if 0 <= free < need:
            raise no_space_error(path, need, free)
        tmp.mkdir()

    tdist.on_main(prepare, world)
    error: BaseException | None = None
    try:
        dcp.save(state, checkpoint_id=str(tmp / "dcp"))
    except Exception as e:  # noqa: BLE001 -- reported by rank 0 below, after every rank is done
        error = e
    errors = tdist.gather_objects(None if error is None else f"{type(error).__name__}: {error}", world)

    def finish() -> None:
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if bad:
            full = any("No space left" in e or "os error 28" in e for e in bad) or 0 <= _free(path.parent) < 1 << 20
            _remove(tmp)
            if full:
                raise no_space_error(path)
            raise RuntimeError(f"saving {path} failed: {'; '.join(bad)}")
        try:
            with open(tmp / "trainer.pt", "wb") as f:
                torch.save(trainer_state, f)
            _fsync_tree(tmp)
        except BaseException as e:
            _remove(tmp)
            if _no_space(e) and isinstance(e, Exception):
                raise no_space_error(path) from e
            raise
        _swap_into_place(tmp, path)
        _prune(out, keep)

    tdist.on_main(finish, world)
    return path


def load_sharded(path: Path, core: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Fill ``core`` and ``optimizer`` from ``path/dcp`` (any number of ranks, any strategy, or one process without
    a process group: DCP reads the pieces each rank's shards need). The learning rate is set to ``lr``."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(core, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(Path(path) / "dcp"))
    set_state_dict(core, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _optimizer_dtypes(optimizer)
    for g in optimizer.param_groups:
        g["lr"] = lr


def load_full_optimizer_state(
    core: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], lr: float
) -> None:
    """A single-process ``trainer.pt`` optimizer state (keyed by parameter index, as ``optimizer.state_dict()``) into
    an optimizer over ``core.parameters()`` that may be sharded (FSDP2): the indices become parameter names and
    ``set_optimizer_state_dict`` cuts every rank's shard out of the full tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, _ in core.named_parameters()]
    ids = [int(i) for g in state["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise RunDirError(f"the checkpoint's optimizer holds {len(ids)} tensors, the model has {len(names)}")
    fqn = dict(zip(ids, names))
    full = {
        "state": {fqn[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "lr": lr, "params": [fqn[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(core, optimizer, full, options=StateDictOptions(full_state_dict=True))
    _optimizer_dtypes(optimizer)
    for g in optimizer.param_groups:
        g["lr"] = lr


def _optimizer_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """AdamWScale's ``step`` is an fp32 tensor on its parameter's device (a CPU one would freeze in a CUDA graph)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and isinstance(st.get("step"), torch.Tensor):
                local = p.to_local() if hasattr(p, "to_local") else p
                st["step"] = st["step"].to(device=local.device, dtype=torch.float32)


def load_full_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Whole (``save_pretrained``) weights into a model whose core may be sharded (FSDP2): each rank keeps its
    shards of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def full_model_state(core: torch.nn.Module, world: Any) -> dict[str, torch.Tensor] | None:
    """The whole model's state on rank 0's CPU (gathered from the shards under FSDP2; collective), None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if world.strategy != "fsdp":
        return core.state_dict() if world.main else None
    sd = get_model_state_dict(core, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if world.main else None
