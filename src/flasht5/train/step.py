"""One training step, eager or replayed from a CUDA graph: the only place that knows about autocast, backward,
gradient clipping and the optimizer step.

``TrainStep(model, optimizer)(batch)`` runs forward (bf16 autocast on CUDA by default), backward, clips the global
gradient norm and steps the optimizer, with no host synchronisation: it returns device tensors (loss, z-term,
gradient norm) that the caller reads only when it logs.

With ``cuda_graph=True`` (the default on CUDA) the first ``warmup`` steps run eagerly (they compile the kernels and
settle the allocator), then the whole step -- forward, backward, clipping, optimizer -- is captured once in a CUDA
graph, and every later batch of the same shapes is copied into the graph's static inputs and replayed: the host then
does a few copies and one launch per step, whatever the model's size. Batch shapes must be static for that (the
packer's ``max_docs`` gives varlen batches fixed token and document counts). A batch of other shapes runs eagerly
(and is counted and reported; the graph stays for the next batches); a layout that needs a host synchronisation
(padded or packed rows on the flash backend) makes the step say so once and run eagerly from then on. The
optimizer's learning rate becomes a device tensor that :meth:`TrainStep.set_lr` updates in place.

Following PyTorch's whole-network capture recipe ("CUDA Graphs", torch.cuda docs): eager warm-up steps first,
gradients allocated inside the graph (set to None before capture, never zeroed after), autocast's weight cache off.
The capture step itself runs by replaying the graph, so every step updates the weights exactly once.

Several micro-batches (gradient accumulation, ``step([b0, b1, ...])``) and several ranks (``world`` with DDP or
FSDP2, :mod:`flasht5.train.dist`): the loss of micro-batch i is weighted by ``n_i * world_size / N``, where n_i
counts its target tokens (labels != -100) and N those of the global batch (every micro-batch of every rank, one
all-reduce of a scalar before the forward). DDP / FSDP average gradients over the ranks, so the update is the
gradient of the token-weighted mean loss over the global batch: N ranks x B, 1 rank x N*B and 1 rank x B x N
accumulation steps make the same update. The step's ``loss`` is then this rank's share of the global mean (the sum
over ranks is the mean; the loop sums at log time). Gradients are synchronised once per step (DDP's ``no_sync`` /
FSDP2's ``set_requires_gradient_sync`` for all but the last micro-batch). With a single micro-batch on one rank
nothing is weighted (bit-identical to the plain step).

CUDA graphs and data parallelism: a DDP step is captured following PyTorch's recipe (DDP built on a side stream,
at least 11 eager DDP steps before capture, NCCL >= 2.9.6 records the all-reduces in the graph); FSDP2 steps and
accumulated steps run eagerly (FSDP2's all-gathers are driven by host-side hooks that a replay would skip).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from flasht5.layout import Batch, Layout

log = logging.getLogger("flasht5")


class StepOutput(NamedTuple):
    loss: Tensor
    z_loss: Tensor | None
    grad_norm: Tensor


def _signature(batch: Batch) -> tuple:
    lay = lambda lo: (
        lo.kind,
        lo.batch,
        lo.length,
        lo.max_seqlen,
        None if lo.cu_seqlens is None else lo.cu_seqlens.numel(),
    )
    shape = lambda t: None if t is None else tuple(t.shape)
    return (shape(batch.input_ids), shape(batch.labels), shape(batch.decoder_input_ids), lay(batch.enc), lay(batch.dec))


class TrainStep:
    """See the module docstring. ``grad_clip <= 0`` disables clipping (the norm is still returned)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grad_clip: float = 1.0,
        amp_dtype: torch.dtype | None = torch.bfloat16,
        cuda_graph: bool | None = None,
        warmup: int = 3,
        world: Any = None,
    ):
        self.model, self.optimizer = model, optimizer
        self.world = world  # flasht5.train.dist.World, or None: one process
        self.world_size = 1 if world is None or not world.active else int(world.world_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.device = self.params[0].device
        self.grad_clip = float(grad_clip)
        on_cuda = self.device.type == "cuda"
        self.amp_dtype = amp_dtype if on_cuda else None
        self.use_graph = on_cuda if cuda_graph is None else bool(cuda_graph)
        if self.use_graph and not on_cuda:
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.warmup = max(1, int(warmup))
        self.steps = 0
        self.eager_batches = 0  # batches that did not fit the captured graph's shapes
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[Batch, StepOutput] | None = None
        self._signature: tuple | None = None
        if self.use_graph:  # the learning rate must live on the device to change between replays
            for group in optimizer.param_groups:  # (a resumed optimizer may bring a CPU tensor)
                group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(self.device)

    # -- public ------------------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    @property
    def graphed(self) -> bool:
        """Whether steps are replayed from the captured graph."""
        return self._graph is not None

    def __call__(self, batch: Batch | Sequence[Batch]) -> StepOutput:
        """One optimizer step on ``batch``, or on the micro-batches of a list (gradient accumulation)."""
        self.steps += 1
        if not isinstance(batch, Batch):
            if len(batch) != 1:
                if self.use_graph:
                    self._give_up("gradient accumulation steps run eagerly")
                self.optimizer.zero_grad(set_to_none=True)
                return self._forward_backward_step([b.to(self.device, non_blocking=True) for b in batch])
            batch = batch[0]
        if self.use_graph:
            sig = _signature(batch)
            self._signature = self._signature or sig  # the shapes the graph is (or will be) captured for
            if sig != self._signature:
                self._eager_once(f"a batch of other shapes ({sig}, graph: {self._signature}) runs eagerly")
            elif self._graph is not None:
                return self._replay(batch)
            elif self.steps > self.warmup and self._capturable(batch):
                return self._capture(batch)
        return self._eager(batch.to(self.device, non_blocking=True))

    # -- the step itself ---------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: inside a graph it would hold the casts of the capture.
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _forward_backward_step(self, batch: Batch | list[Batch]) -> StepOutput:
        micro = batch if isinstance(batch, list) else [batch]
        if len(micro) == 1 and self.world_size == 1:
            with self._autocast():
                out = self.model(batch.input_ids, batch.decoder_input_ids, batch.labels, enc=batch.enc, dec=batch.dec)
            out.loss.backward()
            loss, z = out.loss.detach(), None if out.z_loss is None else out.z_loss.detach()
        else:
            loss, z = self._weighted_forward_backward(micro)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.optimizer.step()
        return StepOutput(loss, z, _plain(norm))

    def _weighted_forward_backward(self, micro: list[Batch]) -> tuple[Tensor, Tensor | None]:
        """Token-weighted forward + backward of every micro-batch (see the module docstring); returns this rank's
        shares of the global mean loss and z-term."""
        counts = [(b.labels != -100).sum() for b in micro]
        total = torch.stack(counts).sum().to(torch.float32)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        total = total.clamp_min(1.0)
        loss = z = None
        last = len(micro) - 1
        sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2
        for i, b in enumerate(micro):
            ctx = self.model.no_sync() if i < last and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            if sync is not None:
                sync(i == last)
            with ctx:
                with self._autocast():
                    out = self.model(b.input_ids, b.decoder_input_ids, b.labels, enc=b.enc, dec=b.dec)
                share = counts[i] / total
                (out.loss * (share * self.world_size)).backward()
            part = out.loss.detach() * share
            loss = part if loss is None else loss + part
            if out.z_loss is not None:
                zp = out.z_loss.detach() * share
                z = zp if z is None else z + zp
        return loss, z

    def _eager(self, batch: Batch) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        return self._forward_backward_step(batch)

    # -- CUDA graph ----------------------------------------------------------------------------------------------
    def _capturable(self, batch: Batch) -> bool:
        for name, lay in (("encoder", batch.enc), ("decoder", batch.dec)):
            if lay.kind not in ("dense", "varlen"):
                self._give_up(f"the {name} layout is {lay.kind!r} (finding its real tokens needs a host sync)")
                return False
        return True

    def _give_up(self, why: str) -> None:
        log.warning("flasht5: training step not graph-captured, running eagerly: %s", why)
        self.use_graph, self._graph, self._static = False, None, None

    def _eager_once(self, what: str) -> None:
        """A batch that does not fit the graph runs eagerly (the graph stays for the next ones); said a few times."""
        self.eager_batches += 1
        if self.eager_batches <= 3:
            log.warning("flasht5: %s%s", what, " (not repeated)" if self.eager_batches == 3 else "")

    def _capture(self, batch: Batch) -> StepOutput:
        static = _static_copy(batch, self.device)
        # The eager warm-up steps compiled the kernels and created the optimizer state; the gradients are set to
        # None so that the captured backward allocates them in the graph's pool (and overwrites them on replay).
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps allocating page-locked buffers while the step is
        # captured; in the default global mode those calls invalidate the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._forward_backward_step(static)
        self._graph, self._static = graph, (static, out)
        log.info("flasht5: training step captured in a CUDA graph (shapes %s)", self._signature)
        return self._replay(batch)

    def _replay(self, batch: Batch) -> StepOutput:
        static, out = self._static
        _copy_into(static, batch)
        self._graph.replay()
        # The graph's outputs are overwritten by the next replay: hand out copies.
        return StepOutput(out.loss.clone(), None if out.z_loss is None else out.z_loss.clone(), out.grad_norm.clone())


def _plain(norm: Tensor) -> Tensor:
    """FSDP2's clip_grad_norm_ returns the global norm as a replicated DTensor; the loop wants a tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _static_copy(batch: Batch, device: torch.device) -> Batch:
    """Device buffers shaped like ``batch`` (its values copied in), whose layouts read them."""
    buf = lambda t: None if t is None else torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t)
    lay = lambda lo: Layout(lo.kind, lo.batch, lo.length, cu_seqlens=buf(lo.cu_seqlens), max_seqlen=lo.max_seqlen)
    return Batch(buf(batch.input_ids), buf(batch.labels), lay(batch.enc), lay(batch.dec), buf(batch.decoder_input_ids))


def _copy_into(static: Batch, batch: Batch) -> None:
    pairs: list[tuple[Any, Any]] = [
        (static.input_ids, batch.input_ids), (static.labels, batch.labels),
        (static.decoder_input_ids, batch.decoder_input_ids),
        (static.enc.cu_seqlens, batch.enc.cu_seqlens), (static.dec.cu_seqlens, batch.dec.cu_seqlens),
    ]  # fmt: skip
    for dst, src in pairs:
        if dst is not None:
            dst.copy_(src, non_blocking=True)
