"""UL2 batches from a token store: sample a denoiser per chunk, corrupt, pack by token budget, emit tensors.

Pipeline, per shard (a shard is one (rank, DataLoader worker) pair; shards read disjoint documents):

1. documents in a seeded per-epoch permutation, dealt round-robin to the shards;
2. each document is cut into consecutive chunks; every chunk draws its denoiser from the mixture and takes as many
   tokens as that denoiser can encode within ``max_input_len`` / ``max_target_len`` (:func:`ul2.max_chunk_length`),
   so overlong documents are split and nothing is ever truncated or dropped; all randomness of a document comes from
   its own Philox stream keyed by (seed, epoch, doc id), so a document is corrupted the same way on any number of
   ranks and workers;
3. examples wait in a pool of about ``lookahead`` batches and are packed (see :meth:`UL2Dataset._pack`) into bins
   with an encoder and a decoder budget: one bin of ``max_tokens`` / ``max_target_tokens`` tokens in ``"varlen"``
   mode, ``max_tokens // row_len`` rows of ``row_len`` / ``row_target_len`` in ``"padded"`` mode. Rows only pack
   well when they hold several examples: for UL2 mixtures use ``row_len`` of a few ``max_input_len``;
4. the batch becomes a :class:`flasht5.layout.Batch` (token ids, labels and both layouts, in the form the model's
   kernels eat; see :meth:`UL2Dataset.collate_varlen` / :meth:`UL2Dataset.collate_padded`) plus ``stats``, python
   numbers for logging. Decoder inputs are not emitted: the model shifts the labels right per document with its
   own config's decoder start id (one definition, :func:`flasht5.layout.shift_right`).

Static shapes (``max_docs``, varlen mode): every batch then has exactly ``max_tokens`` / ``max_target_tokens`` tokens
and ``max_docs`` documents, so a training step can be captured once in a CUDA graph and replayed. The unused tail of
each budget becomes padding documents (pad ids, labels -100) no longer than ``max_input_len`` / ``max_target_len``,
and trailing empty documents fill ``cu_seqlens`` up to ``max_docs + 1`` entries; a bin takes an example only while
its examples and the padding documents its remaining tail would need fit in ``max_docs`` (so a bin of many short
examples, whose tail is small, is not capped by the room a nearly empty bin would need for its padding).

Packed examples never see each other: in varlen form each is its own ``cu_seqlens`` segment (encoder segment i pairs
with decoder segment i); in padded form every token carries its example's segment id (decoder segment ids equal the
encoder's in the same row) and positions restart at 0 per example.

Resumption: ``state_dict()`` holds, per shard, the epoch, the next document position and the keys of the examples
waiting in the pool; restoring regenerates them and the stream continues exactly. With ``num_workers == 0`` the
dataset's own ``state_dict()`` is exact. With worker processes the main process cannot see the workers' state;
:class:`ResumableLoader` wraps the ``DataLoader``, takes each worker's state from the batches it delivers, and on
restore gives the workers their shards back in the order the ``DataLoader`` will poll them, so the stream continues
exactly as long as ``num_workers`` is unchanged (and for the infinite default ``epochs=None``; a finite stream
restores exactly too unless a worker had already run dry). Changing ``world_size`` or ``num_workers`` re-deals
documents: the state then cannot be applied and ``load_state_dict`` says so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flasht5.data.store import TokenStore
from flasht5.data.ul2 import Denoiser, _corrupt, denoised_lengths, max_chunk_length, resolve_mixture
from flasht5.layout import Batch, Layout

MODES = ("varlen", "padded")
_MAX_WAIT = 4  # batches an example may be passed over before it is packed first
# One example in flight: (encoder ids + EOS, target ids + EOS, denoiser index, raw chunk length, key, age),
# key = (epoch, position in the shard's document order, chunk index within the document).
Example = tuple[np.ndarray, np.ndarray, int, int, tuple[int, int, int], int]


class UL2Dataset(IterableDataset):
    """Infinite (or ``epochs``-long) stream of packed UL2 batches from a :class:`TokenStore`.

    Each item is ``{"batch": Batch, "stats": {...}}``; with ``emit_example_keys = True`` (an attribute, off by
    default: it costs one document permutation per shard) also ``"examples"``: the key ``[epoch, document index,
    chunk index]`` of every example of the batch in batch order (varlen: document order; padded: row by row). The
    key names the example exactly: its tokens and corruption come from (seed, epoch, document) alone. The training
    loop's ``train.record_steps`` writes them per step.

    Args:
        store: a TokenStore or its folder.
        denoisers: a preset name (``"t5"``, ``"ul2"``, ``"fat5"``) or a list (see :func:`ul2.resolve_mixture`).
        sentinel_ids: ``<extra_id_0>``, ``<extra_id_1>``, ... ids (see ``tokenizer.sentinel_ids``).
        prefix_ids: token ids of each mode prefix used by the mixture (see ``tokenizer.mode_token_ids``).
        eos_id, pad_id: T5's 1 and 0.
        max_input_len, max_target_len: per-example limits, EOS and mode tokens included.
        max_tokens: encoder tokens per batch (varlen: the budget; padded: ``max_tokens // row_len`` rows).
        max_target_tokens: decoder tokens per batch in varlen mode (default: ``max_tokens`` times the mixture's
            expected target/input ratio plus 25 %, so that the encoder budget is the one that binds).
        mode: ``"varlen"`` (padding-free, cu_seqlens) or ``"padded"`` (rows with segment ids).
        row_len, row_target_len: padded row lengths (default ``max_input_len``, and ``max_target_len`` or
            ``row_len`` times the mixture's expected target/input ratio, whichever is larger).
        seed: seeds document order and every corruption.
        rank, world_size: distributed sharding; each rank (and each DataLoader worker in it) reads its own documents.
        shuffle: permute documents every epoch (else store order).
        epochs: stop after this many passes over the data (``None``: never stop).
        lookahead: pool size, in batches, that packing chooses from.
        max_docs: varlen mode only: static batch shapes with this many documents per batch (module docstring);
            None: every batch has the shape of its contents.
    """

    emit_example_keys: bool = False  # items carry "examples": [epoch, document, chunk] per example (class docstring)

    def __init__(
        self,
        store: TokenStore | str | Path,
        *,
        denoisers: str | Sequence[Any] = "t5",
        sentinel_ids: Sequence[int] | np.ndarray,
        prefix_ids: Mapping[str, Sequence[int]] | None = None,
        eos_id: int = 1,
        pad_id: int = 0,
        max_input_len: int = 512,
        max_target_len: int = 114,
        max_tokens: int | None = None,
        max_target_tokens: int | None = None,
        mode: str = "varlen",
        row_len: int | None = None,
        row_target_len: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: int | None = None,
        lookahead: float = 2.0,
        max_docs: int | None = None,
    ) -> None:
        super().__init__()
        self.store = store if isinstance(store, TokenStore) else TokenStore(store)
        self.mixture = resolve_mixture(denoisers)
        self.denoisers: list[Denoiser] = [d for d, _ in self.mixture]
        self.probs = np.array([p for _, p in self.mixture], dtype=np.float64)
        self.sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64).reshape(-1)
        if self.sentinel_ids.size == 0:
            raise ValueError("sentinel_ids is empty")
        prefix_ids = dict(prefix_ids or {})
        missing = sorted({d.prefix for d in self.denoisers if d.prefix and d.prefix not in prefix_ids})
        if missing:
            raise ValueError(f"prefix_ids has no ids for mode prefix(es) {missing} used by the denoisers")
        self.prefixes = [np.asarray(prefix_ids.get(d.prefix, []), dtype=np.int32).reshape(-1) for d in self.denoisers]
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None or >= 1, got {epochs}")
        if lookahead < 1.0:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.max_input_len, self.max_target_len = int(max_input_len), int(max_target_len)
        self.chunk_lens = np.array(
            [
                max_chunk_length(
                    d,
                    max_input_len=max_input_len,
                    max_target_len=max_target_len,
                    num_prefix_tokens=len(p),
                    num_sentinels=len(self.sentinel_ids),
                )
                for d, p in zip(self.denoisers, self.prefixes)
            ],
            dtype=np.int64,
        )
        self.mode = mode
        self.row_len = int(row_len or max_input_len)
        self.row_target_len = int(row_target_len or max_target_len)  # final default set below, needs chunk_lens
        if self.row_len < max_input_len or self.row_target_len < max_target_len:
            raise ValueError("row_len / row_target_len must be >= max_input_len / max_target_len")
        self.max_tokens = int(max_tokens if max_tokens is not None else 16 * self.row_len)
        self._set_budgets(max_target_tokens, row_target_len)
        self._set_max_docs(max_docs)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.epochs, self.lookahead = shuffle, epochs, float(lookahead)
        self.denoiser_names = [
            f"{d.prefix or '-'}(mu={d.mu:g},r={d.r:g}{',S' if d.is_prefix_lm else ''})" for d in self.denoisers
        ]
        self._cum = np.cumsum(self.probs)
        self._restore: dict[int, dict[str, Any]] = {}
        self._live: dict[int, dict[str, Any]] = {}
        self._worker_shards: list[int] | None = None  # set by ResumableLoader: new worker id -> old shard
        self._attach_state = False  # set by ResumableLoader: batches carry their worker's state
        self._gen: np.random.Generator | None = None
        self._eos = np.array([self.eos_id], dtype=np.int32)
        self._sentinels32 = self.sentinel_ids.astype(np.int32)  # the store yields int32 tokens
        if not 0 <= self.seed < 2**63 or len(self.store) >= 2**40:
            raise ValueError(f"seed must be in [0, 2**63) and the store below 2**40 documents, got seed={seed}")

    @classmethod
    def from_tokenizer(cls, store: TokenStore | str | Path, tokenizer: Any, **kwargs: Any) -> UL2Dataset:
        """Build the dataset with the tokenizer's sentinels, mode tokens, EOS, pad and decoder start (= pad, as T5)."""
        return cls(store, **tokenizer_kwargs(tokenizer, kwargs.get("denoisers", "t5")), **kwargs)

    def _set_budgets(self, max_target_tokens: int | None, row_target_len: int | None, row_margin: float = 1.0) -> None:
        """The batch budgets and bins, from ``max_tokens``, ``row_len`` and the length limits. varlen: the decoder
        budget defaults to the data's target/input ratio plus 25 %, so the encoder budget binds. padded: rows whose
        decoder part matches that ratio (times ``row_margin``, rounded up to 8), so neither half of a row is mostly
        padding; T5's own ratio keeps max_target_len."""
        if self.mode == "varlen":
            if self.max_tokens < self.max_input_len:
                raise ValueError(f"max_tokens={self.max_tokens} must be >= max_input_len={self.max_input_len}")
            default = max(int(np.ceil(self.max_tokens * self.expected_target_ratio() * 1.25)), self.max_target_len)
            self.max_target_tokens = int(max_target_tokens if max_target_tokens is not None else default)
            if self.max_target_tokens < self.max_target_len:
                raise ValueError(
                    f"max_target_tokens={self.max_target_tokens} must be >= max_target_len={self.max_target_len}"
                )
            self.bins_enc = np.array([self.max_tokens], dtype=np.int64)
            self.bins_dec = np.array([self.max_target_tokens], dtype=np.int64)
            return
        if row_target_len is None:
            fit = int(np.ceil(self.row_len * self.expected_target_ratio() * row_margin / 8) * 8)
            row_target_len = max(self.max_target_len, fit)
        self.row_target_len = int(row_target_len)
        rows = self.max_tokens // self.row_len
        if rows < 1:
            raise ValueError(f"max_tokens={self.max_tokens} holds no row of row_len={self.row_len}")
        self.max_target_tokens = rows * self.row_target_len
        self.bins_enc = np.full(rows, self.row_len, dtype=np.int64)
        self.bins_dec = np.full(rows, self.row_target_len, dtype=np.int64)

    def _padding_docs(self) -> int:
        """The most padding documents a static batch needs: those filling an empty encoder or decoder budget."""
        return max(-(-self.max_tokens // self.max_input_len), -(-self.max_target_tokens // self.max_target_len))

    def _set_max_docs(self, max_docs: int | None) -> None:
        self.max_docs = None
        if max_docs is None:
            return
        if self.mode != "varlen":
            raise ValueError("max_docs (static batch shapes) needs mode='varlen'")
        tail = self._padding_docs()
        if max_docs <= tail:
            raise ValueError(
                f"max_docs={max_docs} leaves no room for examples: the padding of a batch can need {tail} "
                f"documents of at most max_input_len / max_target_len tokens"
            )
        self.max_docs = int(max_docs)

    def expected_target_ratio(self, sample_docs: int = 2000) -> float:
        """Expected decoder tokens per encoder token of the mixture on this store (EOS, prefixes, sentinels in).

        Estimated on up to ``sample_docs`` evenly spaced documents: a document of n tokens is cut into about
        ``n / sum_k p_k min(n, L_k)`` chunks, a chunk of denoiser k holding ``min(n, L_k)`` tokens.
        """
        n_docs = len(self.store)
        idx = np.linspace(0, n_docs - 1, num=min(n_docs, sample_docs)).astype(np.int64)
        offsets = self.store.offsets  # read only the sampled boundaries, not every document length
        lengths = (offsets[idx + 1] - offsets[idx]).astype(np.float64)
        if lengths.size == 0:
            lengths = self.chunk_lens.astype(np.float64)
        raw = np.minimum(lengths[None, :], self.chunk_lens[:, None])  # (denoisers, docs) chunk sizes
        chunks = lengths / (self.probs @ raw)  # (docs,) chunks per document
        enc = np.zeros_like(raw)
        dec = np.zeros_like(raw)
        for k, (d, pre) in enumerate(zip(self.denoisers, self.prefixes)):
            if d.is_prefix_lm:  # the split is random: use its mean
                dec[k] = d.density * raw[k] + 2.0  # + sentinel + EOS
                enc[k] = raw[k] - d.density * raw[k] + len(pre) + 2.0
            else:
                inp, tgt, _ = denoised_lengths(raw[k].astype(np.int64), d, len(pre))
                enc[k], dec[k] = inp + 1.0, tgt + 1.0
        return float((chunks * (self.probs @ dec)).sum() / (chunks * (self.probs @ enc)).sum())

    # -- document -> examples ----------------------------------------------------------------------------------

    def _rng_for(self, epoch: int, doc_id: int) -> np.random.Generator:
        """The document's own random stream: Philox keyed by (seed, epoch, doc id). Philox streams under distinct
        keys are independent, and re-keying one generator costs microseconds where a new SeedSequence-seeded
        generator costs ~30x more, which matters for short documents."""
        if self._gen is None:
            self._gen = np.random.Generator(np.random.Philox(key=0))
        self._gen.bit_generator.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.zeros(4, dtype=np.uint64),
                "key": np.array([self.seed, (epoch << 40) | doc_id], dtype=np.uint64),
            },
            "buffer": np.zeros(4, dtype=np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._gen

    def _doc_examples(self, epoch: int, doc_id: int) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
        """All examples of one document: (encoder ids + EOS, target ids + EOS, denoiser, raw chunk length)."""
        rng = self._rng_for(epoch, doc_id)
        tokens = self.store[doc_id]
        eos = self._eos
        out = []
        cursor, n = 0, len(tokens)
        while cursor < n:
            k = min(int(self._cum.searchsorted(rng.random() * self._cum[-1], side="right")), len(self._cum) - 1)
            chunk = tokens[cursor : cursor + int(self.chunk_lens[k])]
            cursor += len(chunk)
            enc, dec = _corrupt(chunk, self.denoisers[k], rng, self._sentinels32, self.prefixes[k], eos)
            out.append((enc, dec, k, len(chunk)))
        return out

    def _order(self, epoch: int, shard: int, num_shards: int) -> np.ndarray:
        n = len(self.store)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(n)
        else:
            perm = np.arange(n)
        return perm[shard::num_shards]

    # -- packing -----------------------------------------------------------------------------------------------

    def _pack(self, pool: list[Example]) -> tuple[list[list[Example]], list[Example], int, int]:
        """Fill the bins from the pool; return (examples per bin, leftovers in pool order and one batch older, their
        encoder tokens, their decoder tokens).

        Two budgets (encoder and decoder tokens) make this vector bin packing. Examples passed over ``_MAX_WAIT``
        times go first, largest first, each into the bin it fits most tightly, so none waits for ever. Then each bin
        is filled best-fit, again and again with the fitting example that maximises its size (encoder + decoder
        share of a bin) minus the imbalance it would leave between the bin's two remaining shares: sizing alone
        would fill the encoder half of every bin with long R chunks and leave the decoder-heavy X and S examples
        waiting (and the decoder half empty). In the spirit of the dot-product heuristics of Panigrahy et al.,
        "Heuristics for Vector Bin Packing" (2011).
        """
        n = len(pool)
        ce, cd = float(self.bins_enc.max()), float(self.bins_dec.max())
        enc = np.fromiter((len(x[0]) for x in pool), dtype=np.int64, count=n)
        dec = np.fromiter((len(x[1]) for x in pool), dtype=np.int64, count=n)
        rem_e, rem_d = self.bins_enc.copy(), self.bins_dec.copy()
        bins: list[list[Example]] = [[] for _ in rem_e]
        count = np.zeros(len(bins), dtype=np.int64)
        le, ld = self.max_input_len, self.max_target_len

        def fits_docs(j: int, e: np.ndarray | int, d: np.ndarray | int) -> np.ndarray | bool:
            # max_docs: the bin's examples, this one and the padding documents of the tail it would leave
            if self.max_docs is None:
                return True
            tail = np.maximum(-(-(rem_e[j] - e) // le), -(-(rem_d[j] - d) // ld))
            return count[j] + 1 + tail <= self.max_docs

        avail = np.ones(n, dtype=bool)
        old = [i for i in range(n) if pool[i][5] >= _MAX_WAIT]
        for i in sorted(old, key=lambda i: (-max(enc[i] / ce, dec[i] / cd), i)):
            fits = (rem_e >= enc[i]) & (rem_d >= dec[i])
            fits &= np.array([fits_docs(j, enc[i], dec[i]) for j in range(len(bins))], dtype=bool)
            if fits.any():
                j = int(np.argmin(np.where(fits, rem_e - enc[i], np.iinfo(np.int64).max)))
                rem_e[j] -= enc[i]
                rem_d[j] -= dec[i]
                count[j] += 1
                bins[j].append(pool[i])
                avail[i] = False
        es, ds = enc / ce, dec / cd
        size = es + ds
        for j in range(len(bins)):
            while True:
                fits = avail & (enc <= rem_e[j]) & (dec <= rem_d[j]) & fits_docs(j, enc, dec)
                if not fits.any():
                    break
                score = size - np.abs((rem_e[j] / ce - es) - (rem_d[j] / cd - ds))
                i = int(np.argmax(np.where(fits, score, -np.inf)))
                rem_e[j] -= enc[i]
                rem_d[j] -= dec[i]
                count[j] += 1
                bins[j].append(pool[i])
                avail[i] = False
        left: list[Example] = [(*pool[i][:5], pool[i][5] + 1) for i in np.flatnonzero(avail)]  # type: ignore[misc]
        return bins, left, int(enc[avail].sum()), int(dec[avail].sum())

    # -- the stream --------------------------------------------------------------------------------------------

    def _fresh_state(self) -> dict[str, Any]:
        return {"epoch": 0, "pos": 0, "pool": [], "batches": 0, "done": False}

    def _rebuild_pool(self, state: dict[str, Any], shard: int, num_shards: int) -> list[Example]:
        cache: dict[tuple[int, int], list] = {}
        orders: dict[int, np.ndarray] = {}
        pool: list[Example] = []
        for epoch, pos, chunk, age in state["pool"]:
            if (epoch, pos) not in cache:
                if epoch not in orders:
                    orders[epoch] = self._order(epoch, shard, num_shards)
                cache[(epoch, pos)] = self._doc_examples(epoch, int(orders[epoch][pos]))
            enc, dec, k, raw = cache[(epoch, pos)][chunk]
            pool.append((enc, dec, k, raw, (epoch, pos, chunk), age))
        return pool

    def _stream(self, shard: int, num_shards: int, state: dict[str, Any]) -> Iterator[tuple[list, dict]]:
        """Yield (bins of examples, state after this batch) for one shard."""
        pool = self._rebuild_pool(state, shard, num_shards)
        epoch, pos = state["epoch"], state["pos"]
        batches = state["batches"]
        order = self._order(epoch, shard, num_shards)
        cap_e, cap_d = self.lookahead * self.bins_enc.sum(), self.lookahead * self.bins_dec.sum()
        pool_e = sum(len(x[0]) for x in pool)
        pool_d = sum(len(x[1]) for x in pool)
        exhausted = state["done"]
        if len(self.store) < num_shards:
            raise ValueError(
                f"the store has {len(self.store)} documents, fewer than the {num_shards} shards "
                f"(world_size x DataLoader workers): some would get no data"
            )
        while True:
            while not exhausted and (pool_e < cap_e or pool_d < cap_d):
                if pos >= len(order):
                    if self.epochs is not None and epoch + 1 >= self.epochs:
                        exhausted = True
                        break
                    epoch, pos = epoch + 1, 0
                    order = self._order(epoch, shard, num_shards)
                    continue
                for c, (enc, dec, k, raw) in enumerate(self._doc_examples(epoch, int(order[pos]))):
                    pool.append((enc, dec, k, raw, (epoch, pos, c), 0))
                    pool_e += len(enc)
                    pool_d += len(dec)
                pos += 1
            if not pool:
                return
            bins, pool, pool_e, pool_d = self._pack(pool)
            batches += 1
            new_state = {
                "epoch": epoch,
                "pos": pos,
                "pool": [[*x[4], x[5]] for x in pool],
                "batches": batches,
                "done": exhausted,
            }
            yield bins, new_state

    def _shard(self) -> tuple[int, int, int, int]:
        """(shard, num_shards, worker id, num workers) of the calling process."""
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        local = wid if self._worker_shards is None else self._worker_shards[wid]
        return self.rank * nw + local, self.world_size * nw, wid, nw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, num_shards, wid, nw = self._shard()
        state = self._restore.pop(shard, None) or self._fresh_state()
        if state.get("num_shards", num_shards) != num_shards:
            raise ValueError(f"state was saved with {state['num_shards']} shards, this run has {num_shards}")
        orders: dict[int, np.ndarray] = {}  # epoch -> this shard's document order (emit_example_keys)
        for bins, new_state in self._stream(shard, num_shards, state):
            new_state["num_shards"] = num_shards
            self._live[shard] = new_state
            batch = self.collate_varlen(bins[0]) if self.mode == "varlen" else self.collate_padded(bins)
            batch["stats"]["epoch"] = new_state["epoch"]
            if self.emit_example_keys:
                keys = [x[4] for row in bins for x in row]  # (epoch, position in the shard's order, chunk)
                for epoch in {k[0] for k in keys} - set(orders):
                    orders[epoch] = self._order(epoch, shard, num_shards)
                for epoch in [e for e in orders if keys and e < min(k[0] for k in keys)]:  # no way back
                    del orders[epoch]
                batch["examples"] = [[e, int(orders[e][pos]), c] for e, pos, c in keys]
            if self._attach_state:
                batch["_state"] = {"worker_id": wid, "local_shard": shard - self.rank * nw, "state": new_state}
            yield batch

    # -- state -------------------------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        cfg = [
            repr(self.mixture),
            self.sentinel_ids.tolist(),
            [p.tolist() for p in self.prefixes],
            self.eos_id,
            self.max_input_len,
            self.max_target_len,
            self.seed,
            self.shuffle,
            len(self.store),
            self.store.num_tokens,
        ]
        return hashlib.sha256(json.dumps(cfg, default=str).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Position of the in-process stream (``num_workers == 0``): exact; see ResumableLoader for workers."""
        return {
            "fingerprint": self._fingerprint(),
            "rank": self.rank,
            "world_size": self.world_size,
            "shards": {int(k): v for k, v in self._live.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream where ``state`` left it (takes effect at the next ``iter``)."""
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError("data state was saved for another store, mixture, length limits or seed")
        if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
            raise ValueError(
                f"data state is for rank {state.get('rank')} of {state.get('world_size')}, "
                f"this is rank {self.rank} of {self.world_size}"
            )
        self._restore = {int(k): dict(v) for k, v in state["shards"].items()}
        self._live = {int(k): dict(v) for k, v in state["shards"].items()}

    # -- collation ---------------------------------------------------------------------------------------------

    def _stats(
        self, examples: Sequence[Example], n_enc: int, n_dec: int, enc_cap: int, dec_cap: int, padded: bool
    ) -> dict[str, Any]:
        counts = np.bincount([x[2] for x in examples], minlength=len(self.denoisers))
        stats: dict[str, Any] = {
            "examples": len(examples),
            "raw_tokens": sum(x[3] for x in examples),  # tokens read from the store
            "input_tokens": n_enc,
            "target_tokens": n_dec,
            "input_padding": enc_cap - n_enc if padded else 0,
            "target_padding": dec_cap - n_dec if padded else 0,
            "padding_frac": (enc_cap - n_enc) / enc_cap if padded else 0.0,
            "target_padding_frac": (dec_cap - n_dec) / dec_cap if padded else 0.0,
            "input_fill": n_enc / enc_cap,
            "target_fill": n_dec / dec_cap,
            "discarded_tokens": 0,  # chunks are sized to fit, so nothing is ever cut; kept so logs prove it
            "carried_examples": sum(1 for x in examples if x[5] > 0),
        }
        for i, c in enumerate(counts.tolist()):
            stats[f"denoiser_{i}"] = c
        return stats

    def collate_varlen(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Padding-free batch: flattened tokens, encoder and decoder ``cu_seqlens`` (example i <-> document i); with
        ``max_docs``, padded to the static shapes (module docstring)."""
        n = len(examples)
        enc_lens = np.fromiter((len(x[0]) for x in examples), dtype=np.int64, count=n)
        dec_lens = np.fromiter((len(x[1]) for x in examples), dtype=np.int64, count=n)
        n_enc, n_dec = int(enc_lens.sum()), int(dec_lens.sum())
        parts_e, parts_d = [x[0] for x in examples], [x[1] for x in examples]
        if self.max_docs is not None:
            pe, pd = (
                _tail_docs(self.max_tokens - n_enc, self.max_input_len),
                _tail_docs(self.max_target_tokens - n_dec, self.max_target_len),
            )
            empty = self.max_docs - n - max(len(pe), len(pd))
            if empty < 0:  # _pack keeps every bin within max_docs; a failure here is a packing bug
                raise RuntimeError(f"{n} examples and {max(len(pe), len(pd))} padding documents exceed max_docs")
            enc_lens = np.concatenate([enc_lens, pe, np.zeros(max(len(pd) - len(pe), 0) + empty, np.int64)])
            dec_lens = np.concatenate([dec_lens, pd, np.zeros(max(len(pe) - len(pd), 0) + empty, np.int64)])
            parts_e.append(np.full(self.max_tokens - n_enc, self.pad_id, dtype=np.int64))
            parts_d.append(np.full(self.max_target_tokens - n_dec, -100, dtype=np.int64))
        enc = np.concatenate(parts_e, dtype=np.int64)
        labels = np.concatenate(parts_d, dtype=np.int64)
        cu = np.zeros(len(enc_lens) + 1, dtype=np.int32)
        np.cumsum(enc_lens, out=cu[1:])
        dcu = np.zeros(len(dec_lens) + 1, dtype=np.int32)
        np.cumsum(dec_lens, out=dcu[1:])
        static = self.max_docs is not None
        max_e = self.max_input_len if static else int(enc_lens.max())
        max_d = self.max_target_len if static else int(dec_lens.max())
        batch = Batch(
            torch.from_numpy(enc)[None],  # (1, T_enc)
            torch.from_numpy(labels)[None],  # (1, T_dec)
            Layout("varlen", 1, len(enc), cu_seqlens=torch.from_numpy(cu), max_seqlen=max_e),
            Layout("varlen", 1, len(labels), cu_seqlens=torch.from_numpy(dcu), max_seqlen=max_d),
        )
        cap_e, cap_d = self.max_tokens, self.max_target_tokens
        return {"batch": batch, "stats": self._stats(examples, n_enc, n_dec, cap_e, cap_d, padded=static)}

    def collate_padded(self, rows: Sequence[Sequence[Example]]) -> dict[str, Any]:
        """Rows packed with several examples each, right-padded to row_len / row_target_len (packed layouts:
        decoder segment s of a row belongs to encoder segment s of the same row)."""
        b, li, ld = len(rows), self.row_len, self.row_target_len
        input_ids = np.full((b, li), self.pad_id, dtype=np.int64)
        seg = np.zeros((b, li), dtype=np.int32)
        labels = np.full((b, ld), -100, dtype=np.int64)
        dseg = np.zeros((b, ld), dtype=np.int32)
        n_enc = n_dec = 0
        for r, row in enumerate(rows):
            oe = od = 0
            for s, (enc, dec, *_) in enumerate(row, start=1):
                ne, nd = len(enc), len(dec)
                input_ids[r, oe : oe + ne] = enc
                seg[r, oe : oe + ne] = s
                labels[r, od : od + nd] = dec
                dseg[r, od : od + nd] = s
                oe += ne
                od += nd
            n_enc += oe
            n_dec += od
        flat = [x for row in rows for x in row]
        batch = Batch(
            torch.from_numpy(input_ids),  # (B, Li)
            torch.from_numpy(labels),  # (B, Ld)
            Layout("packed", b, li, segment_ids=torch.from_numpy(seg)),
            Layout("packed", b, ld, segment_ids=torch.from_numpy(dseg)),
        )
        return {"batch": batch, "stats": self._stats(flat, n_enc, n_dec, b * li, b * ld, padded=True)}

    def iter_examples(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(encoder ids + EOS, target ids + EOS) of every chunk of this rank's documents in one epoch, unpacked."""
        for doc_id in self._order(epoch, self.rank, self.world_size):
            for enc, dec, _, _ in self._doc_examples(epoch, int(doc_id)):
                yield enc, dec


class ResumableLoader:
    """``DataLoader(dataset, batch_size=None, num_workers=...)`` whose ``state_dict()`` restores the exact stream.

    Every batch a worker produces carries that worker's state (removed before the batch reaches you); the loader
    keeps the state of the last batch delivered per worker and which worker the DataLoader polls next.
    """

    def __init__(self, dataset: UL2Dataset, *, num_workers: int = 0, **dataloader_kwargs: Any) -> None:
        if dataloader_kwargs.pop("batch_size", None) is not None:
            raise ValueError("batches are built by the dataset: batch_size must stay None")
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.kwargs = dataloader_kwargs
        self._states: dict[int, dict[str, Any]] = {}  # new worker id -> {"local_shard", "state"}
        self._next = 0
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        if self.num_workers == 0:
            yield from ds
            return
        w = self.num_workers
        shards = list(range(w))
        restore: dict[int, dict[str, Any]] = {}
        if self._pending is not None:
            old = self._pending
            if old["num_workers"] != w:
                raise ValueError(f"data state was saved with {old['num_workers']} workers, the loader has {w}")
            # The DataLoader polls worker 0 first: give it the shard that was due next.
            nxt = old["next"]
            shards = [old["workers"][str((nxt + j) % w)]["local_shard"] for j in range(w)]
            base = ds.rank * w
            restore = {
                base + old["workers"][str(j)]["local_shard"]: old["workers"][str(j)]["state"]
                for j in range(w)
                if old["workers"].get(str(j), {}).get("state") is not None
            }
            self._pending = None
        ds._worker_shards = shards
        ds._attach_state = True
        ds._restore = restore
        self._states = {j: {"local_shard": shards[j], "state": None} for j in range(w)}
        # Workers that have produced nothing since the restore keep the state they were restored with.
        for j in range(w):
            self._states[j]["state"] = restore.get(ds.rank * w + shards[j])
        self._next = 0
        try:
            loader = DataLoader(ds, batch_size=None, num_workers=w, **self.kwargs)
            for batch in loader:
                info = batch.pop("_state")
                self._states[info["worker_id"]] = {"local_shard": info["local_shard"], "state": info["state"]}
                self._next = (info["worker_id"] + 1) % w
                yield batch
        finally:
            ds._attach_state = False
            ds._worker_shards = None
            ds._restore = {}

    def state_dict(self) -> dict[str, Any]:
        if self.num_workers == 0:
            return {"num_workers": 0, "dataset": self.dataset.state_dict()}
        if self._pending is not None:  # loaded but not iterated yet: still the loaded position
            return json.loads(json.dumps(self._pending))
        return {
            "num_workers": self.num_workers,
            "fingerprint": self.dataset._fingerprint(),
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "next": self._next,
            "workers": {str(j): v for j, v in self._states.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"data state was saved with {state['num_workers']} workers, the loader has "
                f"{self.num_workers}: documents would be dealt differently"
            )
        if self.num_workers == 0:
            self.dataset.load_state_dict(state["dataset"])
            return
        if state.get("fingerprint") != self.dataset._fingerprint():
            raise ValueError("data state was saved for another store, mixture, length limits or seed")
        if state.get("world_size") != self.dataset.world_size or state.get("rank") != self.dataset.rank:
            raise ValueError("data state was saved for another rank / world_size")
        self._pending = json.loads(json.dumps(dict(state)))  # a private copy with string worker keys


def tokenizer_kwargs(tokenizer: Any, denoisers: str | Sequence[Any] = "t5") -> dict[str, Any]:
    """``sentinel_ids``, ``prefix_ids`` (for the mixture's mode tokens), ``eos_id`` and ``pad_id`` of a tokenizer,
    to pass to :class:`UL2Dataset` or :func:`eval_examples`."""
    from flasht5.data.tokenizer import mode_token_ids, sentinel_ids

    prefixes = {d.prefix for d, _ in resolve_mixture(denoisers)}
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("tokenizer must have EOS and pad tokens")
    return {
        "sentinel_ids": sentinel_ids(tokenizer),
        "prefix_ids": mode_token_ids(tokenizer, sorted(prefixes)),
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
    }


# -------------------------------------------------------------------------------------------------------------
# Plain (unpacked) batches, e.g. for held-out evaluation.


def collate_plain(
    examples: Sequence[tuple[np.ndarray | Sequence[int], np.ndarray | Sequence[int]]],
    *,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """One example per row, Hugging Face style: ``input_ids``, ``attention_mask``, ``labels`` (-100 padding) and
    ``decoder_attention_mask`` (the model shifts the labels into decoder inputs). Examples are (encoder ids incl.
    EOS, target ids incl. EOS)."""
    if not examples:
        raise ValueError("examples is empty")
    b = len(examples)
    li = max(len(e) for e, _ in examples)
    ld = max(len(t) for _, t in examples)
    input_ids = np.full((b, li), pad_id, dtype=np.int64)
    attn = np.zeros((b, li), dtype=np.int64)
    labels = np.full((b, ld), -100, dtype=np.int64)
    dattn = np.zeros((b, ld), dtype=np.int64)
    for i, (enc, tgt) in enumerate(examples):
        enc, tgt = np.asarray(enc), np.asarray(tgt)
        input_ids[i, : len(enc)] = enc
        attn[i, : len(enc)] = 1
        labels[i, : len(tgt)] = tgt
        dattn[i, : len(tgt)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attn),
        "labels": torch.from_numpy(labels),
        "decoder_attention_mask": torch.from_numpy(dattn),
    }


def _tail_docs(tokens: int, longest: int) -> np.ndarray:
    """Lengths of the padding documents that fill ``tokens`` unused tokens, none longer than ``longest``."""
    n, rest = divmod(tokens, longest)
    return np.array([longest] * n + ([rest] if rest else []), dtype=np.int64)


def eval_examples(
    store: TokenStore | str | Path,
    *,
    num_examples: int | None = None,
    seed: int = 0,
    **dataset_kwargs: Any,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic (encoder, target) examples from a held-out store, in store order (for :func:`collate_plain`).

    Takes the same arguments as :class:`UL2Dataset` (``denoisers``, ``sentinel_ids``, ``prefix_ids``, ``eos_id``,
    ``max_input_len``, ``max_target_len``); the same seed gives the same examples on every run.
    """
    ds = UL2Dataset(store, seed=seed, shuffle=False, epochs=1, **dataset_kwargs)
    out = []
    for ex in ds.iter_examples():
        out.append(ex)
        if num_examples is not None and len(out) >= num_examples:
            break
    return out
