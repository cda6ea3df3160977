"""The batch layout: how the tokens of one side (encoder or decoder) of a batch are laid out.

One :class:`Layout` describes one token tensor, in one of four kinds:

``dense``   (B, L) rows, every token real, one document per row; ``offset`` shifts positions (cached decoding).
``padded``  (B, L) rows with an HF ``attention_mask`` (True = real); one document per row. Right-padded rows may
            be given by their ``lengths`` (B,) instead (:meth:`Layout.right_padded`; a key/value cache's rows):
            the mask is then derived, and nothing about the rows needs a host sync.
``packed``  (B, L) rows holding several documents each: ``segment_ids`` (document id per token, 0 = padding;
            documents are contiguous runs).
``varlen``  (1, T) padding-free tokens, documents delimited by int32 ``cu_seqlens`` (``num_docs + 1``) with
            ``max_seqlen`` >= the longest document (an overstatement costs a little speed, never correctness).

Positions are implied: they restart at 0 in every document (plus ``offset``), for every backend; there is no
``position_ids``. Everything the backends need beyond the constructor's fields is derived lazily, on the device and
without a host synchronisation, and cached on the object (build one layout per batch and reuse it):
:meth:`Layout.positions` (RoPE, FIRE, shift-right, the reference bias), :meth:`Layout.flat` (the padding-free view the
flash kernels eat; padded and packed rows need one sync there to find their real tokens) and :meth:`Layout.rows`
(the row view the reference paths eat; varlen needs one sync there for the exact longest document). While a CUDA
graph is being captured, under ``torch.compile``, and in CUDA inference (autograd off), padded rows take a sync-free
flat view instead: every slot stays (real tokens first, then each row's padding as a trailing document), so the
shapes are static, the rows can be captured and the host never waits, at the price of computing the padding too
(a padded T5-base encoder call on the H200 was host-bound at 59 % GPU busy with the sync; a dense one of the same
shape, which computes every slot, ran at 94 % and took 22 % less time: benchmarks/results/, 2026-12-02).

Validation happens once, in the constructors: shapes, dtypes and devices always; the *values* of ``cu_seqlens`` and
``segment_ids`` only when they are on the CPU (free; collators build them there) or under ``FLASHT5_DEBUG=1``.

:class:`Batch` bundles token ids, labels and the two layouts, as the collators emit them and the training step and
:meth:`flasht5.model.T5.forward` take them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("dense", "padded", "packed", "varlen")


def debug_checks() -> bool:
    """``FLASHT5_DEBUG=1``: value checks that read GPU memory (one host sync each) run too."""
    return os.environ.get("FLASHT5_DEBUG", "0") not in ("", "0", "false", "False")


def _readable(t: Tensor) -> bool:
    """Whether checking ``t``'s values is free (CPU) or asked for (debug), and possible (not while tracing)."""
    return (t.device.type == "cpu" or debug_checks()) and not torch.compiler.is_compiling()


class Flat(NamedTuple):
    """The padding-free view of a layout: what the flash kernels eat.

    index:      (T,) positions of the real tokens in the flattened (B*L) rows, or None when every token is real.
    cu_seqlens: (N + 1,) int32 document boundaries over the T real tokens.
    max_seqlen: upper bound of the document lengths.
    """

    index: Tensor | None
    cu_seqlens: Tensor
    max_seqlen: int
    pad_docs: int = 0  # the last pad_docs documents hold padding (the static view of padded rows)


def static_shapes_needed() -> bool:
    """Whether shapes must not depend on values: under ``torch.compile`` or while a CUDA graph is captured."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _static_view(device: torch.device | None) -> bool:
    """Padded rows keep their padding (module docstring): static shapes needed, or CUDA inference."""
    return static_shapes_needed() or (device is not None and device.type == "cuda" and not torch.is_grad_enabled())


@dataclass(eq=False)
class Layout:
    """How the tokens of one side of a batch are laid out (module docstring). Build with the constructors."""

    kind: str
    batch: int
    length: int
    mask: Tensor | None = None
    segment_ids: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_seqlen: int | None = None
    offset: int = 0
    lengths: Tensor | None = None
    pad_docs: int = 0  # varlen: the last pad_docs documents hold padding (a static flat view of padded rows)
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- constructors (validation happens here, once) -----------------------------------------------------------
    @classmethod
    def dense(cls, batch: int, length: int, *, offset: int = 0) -> Layout:
        return cls("dense", int(batch), int(length), offset=int(offset))

    @classmethod
    def padded(cls, mask: Tensor, *, name: str = "attention_mask") -> Layout:
        """Rows with an HF attention mask (nonzero = real token). An all-ones mask on the CPU becomes ``dense``."""
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            raise ValueError(f"{name} must be a (batch, length) tensor, got {_shape(mask)}")
        mask = mask if mask.dtype == torch.bool else mask != 0
        if mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all()):
            return cls.dense(*mask.shape)
        return cls("padded", mask.shape[0], mask.shape[1], mask=mask)

    @classmethod
    def right_padded(cls, lengths: Tensor, length: int) -> Layout:
        """Rows of ``length`` slots whose first ``lengths[b]`` tokens are real (int32 (B,), on the device)."""
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.dtype != torch.int32:
            raise ValueError(f"lengths must be a 1-D int32 tensor, got {_shape(lengths)}")
        return cls("padded", lengths.shape[0], int(length), lengths=lengths)

    @classmethod
    def packed(cls, segment_ids: Tensor, *, name: str = "segment_ids") -> Layout:
        """Rows holding several documents: ``segment_ids`` (B, L), a document id per token, 0 for padding."""
        if not isinstance(segment_ids, Tensor) or segment_ids.dim() != 2:
            raise ValueError(f"{name} must be a (batch, length) tensor, got {_shape(segment_ids)}")
        if segment_ids.is_floating_point() or segment_ids.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer document ids, got dtype {segment_ids.dtype}")
        if _readable(segment_ids) and segment_ids.numel():
            seg = segment_ids.long()
            if bool((seg < 0).any()):
                raise ValueError(f"{name} must be >= 0 (0 marks padding)")
            # A document is one contiguous run: a id that reappears after another one in its row is an error.
            change = F.pad(seg[:, 1:] != seg[:, :-1], (1, 0), value=True)
            runs = change.sum(1)
            distinct = torch.tensor([torch.unique(row).numel() for row in seg])
            if bool((runs > distinct).any()):
                raise ValueError(f"{name}: every document must be one contiguous run of its id within a row")
        return cls("packed", segment_ids.shape[0], segment_ids.shape[1], segment_ids=segment_ids)

    @classmethod
    def varlen(
        cls, cu_seqlens: Tensor, max_seqlen: int | None = None, *, total: int, name: str = "cu_seqlens"
    ) -> Layout:
        """``total`` padding-free tokens, shape (1, total), split into documents at ``cu_seqlens``.

        ``max_seqlen=None`` is computed: free for a CPU ``cu_seqlens``, one host sync for a GPU one.
        """
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{name} must be a 1-D tensor with num_docs + 1 >= 2 entries, got {_shape(cu_seqlens)}")
        if cu_seqlens.is_floating_point() or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer offsets, got dtype {cu_seqlens.dtype}")
        cu = cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)
        if _readable(cu):
            v = cu.tolist()
            if v[0] != 0 or any(b < a for a, b in zip(v, v[1:])):
                shown = f"{v[:8]}{' ...' if len(v) > 8 else ''}"
                raise ValueError(f"{name} must start at 0 and be non-decreasing, got {shown}")
            if v[-1] != total:
                raise ValueError(f"{name} must end at the number of tokens ({total}), got {v[-1]}")
            if max_seqlen is None:
                max_seqlen = max(b - a for a, b in zip(v, v[1:]))
        if max_seqlen is None:
            max_seqlen = int(cu.diff().max())  # one host sync: pass max_seqlen to avoid it
        if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
        return cls("varlen", 1, int(total), cu_seqlens=cu, max_seqlen=max_seqlen)

    @classmethod
    def from_hf(
        cls,
        batch: int,
        length: int,
        *,
        attention_mask: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        name: str = "input_ids",
        prefix: str = "",
    ) -> Layout:
        """The layout of a (batch, length) token tensor from Hugging Face-style keyword arguments."""
        given = [n for n, v in (("attention_mask", attention_mask), ("segment_ids", segment_ids),
                                ("cu_seqlens", cu_seqlens)) if v is not None]  # fmt: skip
        if len(given) > 1 and not (given == ["attention_mask", "segment_ids"]):
            raise ValueError(
                f"pass one of {prefix}attention_mask, {prefix}segment_ids, {prefix}cu_seqlens; got {given}"
            )
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(
                    f"{prefix}cu_seqlens needs flattened tokens of shape (1, T) in {name}, got batch {batch}"
                )
            return cls.varlen(cu_seqlens, max_seqlen, total=length, name=f"{prefix}cu_seqlens")
        for arg, value in ((f"{prefix}attention_mask", attention_mask), (f"{prefix}segment_ids", segment_ids)):
            if value is not None and tuple(value.shape) != (batch, length):
                raise ValueError(f"{arg} has shape {tuple(value.shape)} but {name} has shape {(batch, length)}")
        if segment_ids is not None:  # segment id 0 already marks padding; an attention mask adds nothing
            return cls.packed(segment_ids, name=f"{prefix}segment_ids")
        if attention_mask is not None:
            return cls.padded(attention_mask, name=f"{prefix}attention_mask")
        return cls.dense(batch, length)

    # -- facts ------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device | None:
        t = next((t for t in (self.mask, self.segment_ids, self.cu_seqlens, self.lengths) if t is not None), None)
        return None if t is None else t.device

    @property
    def num_docs(self) -> int:
        """Documents that pair across a cross-attention (rows, or varlen segments); packed rows: unknown (-1)."""
        if self.kind == "varlen":
            return self.cu_seqlens.numel() - 1
        return -1 if self.kind == "packed" else self.batch

    def check_tokens(self, shape: tuple[int, ...], name: str) -> None:
        """Raise unless a (batch, length, ...) tensor of ``shape`` fits this layout."""
        if len(shape) < 2 or (shape[0], shape[1]) != (self.batch, self.length):
            raise ValueError(f"{name} has shape {tuple(shape)}, its layout describes {(self.batch, self.length)}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Layout:
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, mask=mv(self.mask), segment_ids=mv(self.segment_ids), cu_seqlens=mv(self.cu_seqlens),
                       lengths=mv(self.lengths), _derived={})  # fmt: skip

    # -- derived views (lazy, cached, on the device) ------------------------------------------------------------
    def _cached(self, key: str, build):
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def positions(self, device: torch.device | None = None) -> Tensor:
        """(B, L) int64 position of every token inside its document (0-based, plus ``offset``)."""
        return self._cached("positions", lambda: self._positions(device))

    def _positions(self, device: torch.device | None) -> Tensor:
        device = self.device or device
        if self.kind in ("dense", "padded"):
            return (torch.arange(self.length, device=device) + self.offset)[None].expand(self.batch, -1)
        if self.kind == "packed":
            seg = self.segment_ids
            idx = torch.arange(self.length, device=seg.device)[None].expand_as(seg)
            start = F.pad(seg[:, 1:] != seg[:, :-1], (1, 0), value=True)
            first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
            return idx - first
        cu = self.cu_seqlens.long()
        lengths = cu.diff()
        starts = torch.repeat_interleave(cu[:-1], lengths, output_size=self.length)
        return (torch.arange(self.length, device=cu.device) - starts)[None]

    def segments(self) -> Tensor | None:
        """(B, L) document id per token (0 = padding) for packed and varlen layouts; None otherwise."""
        if self.kind == "packed":
            return self.segment_ids
        if self.kind != "varlen":
            return None
        return self._cached("segments", lambda: torch.repeat_interleave(
            torch.arange(1, self.num_docs + 1, device=self.cu_seqlens.device), self.cu_seqlens.long().diff(),
            output_size=self.length)[None])  # fmt: skip

    def key_mask(self) -> Tensor | None:
        """(B, L) bool, True where a token is real; None when all are."""
        if self.kind == "padded" and self.mask is None:
            return self._cached(
                "key_mask", lambda: torch.arange(self.length, device=self.lengths.device) < self.lengths[:, None]
            )
        if self.kind == "padded":
            return self.mask
        if self.kind == "packed":
            return self._cached("key_mask", lambda: self.segment_ids != 0)
        return None

    def flat(self, device: torch.device | None = None) -> Flat:
        """The padding-free view (see :class:`Flat`). Padded and packed rows: one host sync to find the real tokens,
        except in the static view of padded rows (module docstring); packed rows cannot have one."""
        static = (self.kind == "padded" and _static_view(self.device)) or (
            self.kind == "packed" and static_shapes_needed()
        )  # a view of its own, cached apart
        return self._cached("flat_static" if static else "flat", lambda: self._flat(device, static))

    def _flat(self, device: torch.device | None, static: bool) -> Flat:
        if self.kind == "varlen":
            return Flat(None, self.cu_seqlens, int(self.max_seqlen), self.pad_docs)
        if self.kind == "dense":
            cu = torch.arange(self.batch + 1, device=device, dtype=torch.int32) * self.length
            return Flat(None, cu, self.length)
        real = self.key_mask()
        if static:
            if self.kind == "packed":
                raise ValueError(
                    "packed rows (segment_ids) need a host sync to find their documents, which CUDA-graph capture "
                    "and torch.compile cannot take: pass the documents as varlen cu_seqlens instead."
                )
            # No sync: a stable sort puts the real tokens first (row by row), the padding after them; row b's
            # padding is document B + b, so the real documents keep their indices and still pair across attentions.
            index = torch.argsort((~real).flatten().to(torch.uint8), stable=True)
            lengths = real.sum(1, dtype=torch.int32) if self.lengths is None else self.lengths
            docs = torch.cat([lengths, self.length - lengths])
            return Flat(index, F.pad(docs.cumsum(0, dtype=torch.int32), (1, 0)), self.length, self.batch)
        index = real.flatten().nonzero().squeeze(1)  # the one host sync of a padded / packed layout
        if self.kind == "padded":  # one document per row (also an empty one, so rows pair across attentions)
            lengths = real.sum(1, dtype=torch.int32) if self.lengths is None else self.lengths
        else:  # every run of one segment id in a row is a document
            B, L = self.segment_ids.shape
            seg = self.segment_ids.long() + torch.arange(B, device=real.device)[:, None] * (L + 1)
            _, lengths = torch.unique_consecutive(seg.flatten()[index], return_counts=True)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return Flat(index, cu, self.length)  # the row length bounds every document

    def unpadded(self, device: torch.device | None = None) -> tuple[Layout, Tensor | None]:
        """(the layout of this side's tokens once padding is removed, the gather index or None)."""
        if self.kind in ("dense", "varlen"):
            return self, None
        flat = self.flat(device)
        inner = Layout("varlen", 1, int(flat.index.numel()), cu_seqlens=flat.cu_seqlens, max_seqlen=flat.max_seqlen,
                       pad_docs=flat.pad_docs)  # fmt: skip
        return inner, flat.index

    def rows(self) -> tuple[Layout, Tensor | None]:
        """(the row layout the reference paths eat, the flat index of each token in those rows or None): varlen
        documents become one zero-padded row each, so attention costs sum(L_i^2), not T^2; one host sync (the
        exact longest document)."""
        if self.kind != "varlen":
            return self, None
        return self._cached("rows", self._rows)

    def _rows(self) -> tuple[Layout, Tensor]:
        cu = self.cu_seqlens.long()
        n, width = self.num_docs, max(int(cu.diff().max()) if self.num_docs else 0, 1)
        index = (self.segments()[0] - 1) * width + self.positions()[0]
        mask = torch.zeros(n * width, dtype=torch.bool, device=cu.device).index_fill_(0, index, True)
        return Layout("padded", n, width, mask=mask.view(n, width)), index


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """(B, L, ...) -> (1, T, ...): the tokens at ``index`` of the flattened rows."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)[None]


def scatter_tokens(x: Tensor, index: Tensor, batch: int, length: int, fill: float = 0) -> Tensor:
    """(1, T, ...) -> (batch, length, ...), ``fill`` where no token was gathered from."""
    out = x.new_full((batch * length, *x.shape[2:]), fill).index_copy_(0, index, x[0])
    return out.view(batch, length, *x.shape[2:])


def shift_right(labels: Tensor, layout: Layout, start_id: int, pad_id: int) -> Tensor:
    """Decoder inputs from labels: every document starts with ``start_id`` (packed ones too); -100 becomes ``pad_id``.

    The one definition of T5's shift-right (Hugging Face's ``_shift_right``, per document)."""
    shifted = labels.roll(1, dims=-1)
    if layout.kind in ("dense", "padded"):
        shifted[..., 0] = start_id
    else:
        shifted = shifted.masked_fill(layout.positions(labels.device) == 0, start_id)
    return shifted.masked_fill(shifted == -100, pad_id)


@dataclass
class Batch:
    """One batch as the model eats it: token ids, labels, their two layouts (and decoder inputs when not derived)."""

    input_ids: Tensor
    labels: Tensor | None
    enc: Layout
    dec: Layout
    decoder_input_ids: Tensor | None = None

    @classmethod
    def dense(cls, input_ids: Tensor, labels: Tensor, decoder_input_ids: Tensor | None = None) -> Batch:
        return cls(input_ids, labels, Layout.dense(*input_ids.shape), Layout.dense(*labels.shape), decoder_input_ids)

    @classmethod
    def varlen(
        cls, input_ids: Tensor, labels: Tensor, cu_seqlens: Tensor, max_seqlen: int | None,
        decoder_cu_seqlens: Tensor, decoder_max_seqlen: int | None,
    ) -> Batch:  # fmt: skip
        """Padding-free documents: ``input_ids`` (1, T) or (T,), ``labels`` (1, Td) or (Td,)."""
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        labels = labels[None] if labels.dim() == 1 else labels
        enc = Layout.varlen(cu_seqlens, max_seqlen, total=input_ids.shape[1])
        dec = Layout.varlen(decoder_cu_seqlens, decoder_max_seqlen, total=labels.shape[1], name="decoder_cu_seqlens")
        return cls(input_ids, labels, enc, dec)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(mv(self.input_ids), mv(self.labels), self.enc.to(device, non_blocking),
                     self.dec.to(device, non_blocking), mv(self.decoder_input_ids))  # fmt: skip

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True): page-locked host tensors copy to the GPU asynchronously."""
        pin = lambda t: None if t is None else t.pin_memory()
        lay = lambda lo: replace(lo, mask=pin(lo.mask), segment_ids=pin(lo.segment_ids), cu_seqlens=pin(lo.cu_seqlens),
                                 _derived={})  # fmt: skip
        return Batch(pin(self.input_ids), pin(self.labels), lay(self.enc), lay(self.dec), pin(self.decoder_input_ids))


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__
