"""Supervised fine-tuning (``flasht5 finetune``): (input, target) examples -> packed batches -> the one training loop.

What differs from pretraining is only the data source and the evaluation; both are given to
:func:`flasht5.train.loop.train` as a :class:`FinetuneTask`, and everything else (the step, CUDA graphs,
checkpoints and exact resume, metrics.jsonl, loss.png, TensorBoard) is the loop's.

- Examples are read from JSONL / CSV / TSV files (gzip too) or folders saved by ``datasets``' ``save_to_disk``
  (``data.input_key`` / ``data.target_key`` name the fields), tokenized once (``data.prefix`` put before each
  input, EOS after input and target, overlong ones cut to ``data.max_input_len`` / ``data.max_target_len`` and
  counted) and held as two flat token arrays.
- :class:`SFTDataset` is :class:`flasht5.data.packing.UL2Dataset` with one example per "document" instead of
  denoised chunks: the same padding-free bin packing into the same static varlen batches
  (:class:`flasht5.layout.Batch`), the same per-epoch shuffling, sharding and exactly resumable state.
- ``task: seq2seq``: the LM loss on the targets; evaluation = held-out loss, greedy ``generate`` of every held-out
  input (``eval.max_new_tokens``) and ROUGE (``rouge-score``), BLEU (``sacrebleu``) and exact match.
- ``task: classification``: :class:`flasht5.modeling.FlashT5ForSequenceClassification` (transformers'
  T5ForSequenceClassification: the decoder reads the input shifted right, the head reads the decoder state at the
  EOS). In a packed batch the decoder documents are the encoder documents and the labels tensor carries each
  example's class id at its EOS (-100 elsewhere), so the batch type and the packer are unchanged; evaluation =
  held-out loss, accuracy and macro F1.
- The best evaluation (``eval.best_metric``) keeps its model in ``<out_dir>/best``; every evaluation writes its
  predictions to ``<out_dir>/predictions/step-N.jsonl``.

``python -m flasht5.train.finetune`` rebuilds the demo task's data (``configs/finetune/demo_data``).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from flasht5.data.packing import UL2Dataset
from flasht5.data.text import json_object
from flasht5.layout import Batch, shift_right
from flasht5.train import checkpoint as ckpt
from flasht5.train.config import FinetuneConfig

EXAMPLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def log(msg: str) -> None:
    from flasht5.train.loop import log as loop_log  # quiet on the ranks other than 0

    loop_log(msg)


def _main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----------------------------------------------------------------------------------------------------------------
# Reading examples
# ----------------------------------------------------------------------------------------------------------------


def _kind(p: Path) -> str | None:
    from flasht5.data.text import _is_datasets_folder

    if p.is_dir():
        return "datasets" if _is_datasets_folder(p) else None
    name = p.name.lower().removesuffix(".gz")
    return next((s[1:] for s in EXAMPLE_SUFFIXES if name.endswith(s)), None)


def expand_example_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files and ``datasets`` folders of examples (folders and globs expanded, see
    :func:`flasht5.data.text.expand_inputs`); a file of another kind is an error naming it."""
    from flasht5.data.text import expand_inputs

    paths = expand_inputs(inputs)
    for p in paths:
        if _kind(p) is None:
            raise ValueError(
                f"{p} is not an examples file: give .jsonl / .json (one object per line), .csv, .tsv (gzip allowed) "
                "or a folder saved by datasets' save_to_disk"
            )
    return paths


def _open_text(p: Path) -> io.TextIOBase:
    raw = gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")  # noqa: SIM115 - wrapped below
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _records(p: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) of every example in one file or ``datasets`` folder."""
    kind = _kind(p)
    if kind == "datasets":
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{p} is a DatasetDict with splits {sorted(ds)}: give one split's folder, e.g. {p}/train")
        for i, rec in enumerate(ds):
            yield f"{p} row {i}", rec
    elif kind in ("jsonl", "json"):
        with _open_text(p) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield f"{p} line {n}", json_object(line, f"{p} line {n}")
    else:
        with _open_text(p) as f:
            reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
            for n, rec in enumerate(reader, 2):
                yield f"{p} line {n}", rec


def read_examples(
    inputs: str | Path | Sequence[str | Path], input_key: str, target_key: str, *, classification: bool = False
) -> list[tuple[str, Any]]:
    """(input text, target) of every example; the target is text, or for classification a label (text or integer)."""
    out: list[tuple[str, Any]] = []
    for p in expand_example_inputs(inputs):
        for where, rec in _records(p):
            for key in (input_key, target_key):
                if key not in rec:
                    raise ValueError(f"{where} has no field {key!r} (its fields: {sorted(rec)})")
            x, y = rec[input_key], rec[target_key]
            if not isinstance(x, str):
                raise ValueError(f"{where}: field {input_key!r} must be text, got {type(x).__name__}")
            ok = isinstance(y, (str, int)) and not isinstance(y, bool) if classification else isinstance(y, str)
            if not ok:
                want = "a label (text or integer)" if classification else "text"
                raise ValueError(f"{where}: field {target_key!r} must be {want}, got {y!r}")
            out.append((x, y))
    if not out:
        raise ValueError(f"{inputs!r} holds no examples")
    return out


def label_names(train_labels: Sequence[Any], given: Sequence[str] | None) -> list[str]:
    """The class names in id order: ``data.labels``, or the sorted distinct training labels (integers as numbers)."""
    if given is not None:
        return [str(x) for x in given]
    values = set(train_labels)
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def label_ids(labels: Sequence[Any], names: Sequence[str], where: str) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, y in enumerate(labels):
        if str(y) not in index:
            raise ValueError(f"{where}: label {y!r} of example {i} is not one of the classes {list(names)}")
        out[i] = index[str(y)]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tokenized examples and the packed dataset
# ----------------------------------------------------------------------------------------------------------------


class Examples:
    """Tokenized examples as two flat int32 arrays with offsets (cheap to pickle into DataLoader workers).

    ``targets`` holds the target ids + EOS (seq2seq); for classification it is None and ``classes`` holds each
    example's class id."""

    def __init__(self, inputs: list[np.ndarray], targets: list[np.ndarray] | None, classes: np.ndarray | None,
                 raw_lengths: np.ndarray) -> None:  # fmt: skip
        self.enc_flat, self.enc_off = _flatten(inputs)
        self.dec_flat, self.dec_off = _flatten(targets) if targets is not None else (None, None)
        self.classes = classes
        self.raw_lengths = raw_lengths  # input + target tokens before cutting (EOS included)

    def __len__(self) -> int:
        return len(self.enc_off) - 1

    def input(self, i: int) -> np.ndarray:
        return self.enc_flat[self.enc_off[i] : self.enc_off[i + 1]]

    def target(self, i: int) -> np.ndarray:
        """Decoder labels of example i: target ids + EOS, or (classification) the class id at the EOS, -100 before."""
        if self.dec_flat is not None:
            return self.dec_flat[self.dec_off[i] : self.dec_off[i + 1]]
        row = np.full(self.enc_off[i + 1] - self.enc_off[i], -100, dtype=np.int32)
        row[-1] = self.classes[i]
        return row

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        enc = np.diff(self.enc_off)
        return enc, (np.diff(self.dec_off) if self.dec_flat is not None else enc)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.enc_flat, self.enc_off, self.dec_flat, self.dec_off, self.classes):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def _flatten(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=off[1:])
    flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return flat, off


def _encode(tokenizer: Any, texts: list[str], max_len: int, eos_id: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Token ids + EOS of each text, cut to ``max_len`` (EOS kept); also the uncut lengths and how many were cut."""
    # verbose=False: no "longer than the model's maximum length" warning, the cut is ours (and counted)
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    out, raw, cut = [], np.empty(len(ids), dtype=np.int64), 0
    for i, seq in enumerate(ids):
        raw[i] = len(seq) + 1
        if len(seq) > max_len - 1:
            seq, cut = seq[: max_len - 1], cut + 1
        out.append(np.asarray([*seq, eos_id], dtype=np.int32))
    return out, raw, cut


def tokenize_examples(
    tokenizer: Any, examples: Sequence[tuple[str, Any]], cfg: FinetuneConfig, classes: np.ndarray | None = None
) -> tuple[Examples, dict[str, int]]:
    """Tokenize (input, target) pairs as the config says; returns the examples and how many inputs / targets were
    cut."""
    d = cfg.data
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    inputs, raw_in, cut_in = _encode(tokenizer, [d.prefix + x for x, _ in examples], d.max_input_len, eos)
    if cfg.task == "classification":
        return Examples(inputs, None, classes, raw_in), {"inputs_cut": cut_in, "targets_cut": 0}
    targets, raw_tgt, cut_tgt = _encode(tokenizer, [y for _, y in examples], d.max_target_len, eos)
    return Examples(inputs, targets, None, raw_in + raw_tgt), {"inputs_cut": cut_in, "targets_cut": cut_tgt}


class SFTDataset(UL2Dataset):
    """Packed batches of (input, target) examples: :class:`UL2Dataset`'s packing, collation, shuffling, sharding and
    resumable state, with one example per document (nothing denoised, nothing chunked).

    Set up here rather than through ``UL2Dataset.__init__`` (which derives chunk sizes from a denoiser mixture); the
    attributes are the ones the inherited stream, packer and collators read. The budgets follow the same rules:
    ``max_target_tokens`` / ``row_target_len`` default to the data's own target/input token ratio plus 25 %.
    Classification examples have equally long encoder and decoder documents, so both budgets are the encoder's."""

    def __init__(
        self,
        examples: Examples,
        *,
        eos_id: int,
        pad_id: int,
        max_input_len: int,
        max_target_len: int,
        max_tokens: int,
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
        max_docs: int | str | None = None,
    ) -> None:
        torch.utils.data.IterableDataset.__init__(self)
        if mode not in ("varlen", "padded"):
            raise ValueError(f"mode must be varlen or padded, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.store = examples  # what the inherited stream reads: len() and the document order
        self.examples = examples
        self.classification = examples.dec_flat is None
        self.mixture, self.denoisers = [], [None]  # one "denoiser": the _stats counts have one column
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        if self.classification:  # the decoder reads the input: the same lengths on both sides
            max_target_len, max_target_tokens, row_target_len = max_input_len, max_tokens, row_len
        self.max_input_len, self.max_target_len = int(max_input_len), int(max_target_len)
        self.mode = mode
        self.row_len = int(row_len or max_input_len)
        self.max_tokens = int(max_tokens)
        self.row_target_len = self.max_target_len  # varlen; padded rows size it from the data (plus 25 %)
        self._set_budgets(max_target_tokens, row_target_len, row_margin=1.25)
        if max_docs == "auto":  # room for as many examples as the budget holds at 80 % of their mean length
            mean = max(float(self.examples.lengths()[0].mean()), 1.0)
            max_docs = int(np.ceil(self.max_tokens / (0.8 * mean))) + self._padding_docs() + 1
        self._set_max_docs(max_docs)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle, self.epochs, self.lookahead = shuffle, epochs, float(lookahead)
        self._restore, self._live = {}, {}
        self._worker_shards, self._attach_state, self._gen = None, False, None
        self._eos = np.array([self.eos_id], dtype=np.int32)

    def expected_target_ratio(self, sample_docs: int = 0) -> float:
        enc, dec = self.examples.lengths()
        return float(dec.sum() / max(enc.sum(), 1))

    def _doc_examples(self, epoch: int, doc_id: int) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
        ex = self.examples
        return [(ex.input(doc_id), ex.target(doc_id), 0, int(ex.raw_lengths[doc_id]))]

    def _fingerprint(self) -> str:
        cfg = [self.examples.fingerprint(), self.eos_id, self.max_input_len, self.max_target_len, self.seed,
               self.shuffle, len(self.examples)]  # fmt: skip
        return hashlib.sha256(json.dumps(cfg).encode()).hexdigest()[:16]

    def _stats(self, examples, n_enc, n_dec, enc_cap, dec_cap, padded) -> dict[str, Any]:
        stats = super()._stats(examples, n_enc, n_dec, enc_cap, dec_cap, padded)
        del stats["denoiser_0"]
        if not self.classification:  # tokens cut from overlong examples (raw_tokens counts them uncut)
            stats["discarded_tokens"] = stats["raw_tokens"] - n_enc - n_dec
        return stats

    def in_order(self, indices: Sequence[int] | None = None) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """Batches of consecutive examples (no shuffling, no bin packing), so that batch documents map back to example
        indices: (the examples' indices, the collated batch). For evaluation."""
        ids = list(range(len(self.examples))) if indices is None else list(indices)
        group: list[int] = []
        ne = nd = 0
        for i in ids:
            li, lt = len(self.examples.input(i)), len(self.examples.target(i))
            if group and (ne + li > self.max_tokens or nd + lt > self.max_target_tokens):
                yield group, self._collate_ids(group)
                group, ne, nd = [], 0, 0
            group.append(i)
            ne, nd = ne + li, nd + lt
        if group:
            yield group, self._collate_ids(group)

    def _collate_ids(self, ids: list[int]) -> dict[str, Any]:
        if self.max_docs is not None:
            raise ValueError("in_order batches are built without static shapes (max_docs=None)")
        return self.collate_varlen([(*self._doc_examples(0, i)[0], (0, i, 0), 0) for i in ids])


# ----------------------------------------------------------------------------------------------------------------
# Sequence classification on packed batches
# ----------------------------------------------------------------------------------------------------------------


class ClassifierOutput(NamedTuple):
    loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    logits: torch.Tensor  # (tokens, num_labels) in the decoder's inner layout
    labels: torch.Tensor  # (tokens,) class id at each example's EOS, -100 elsewhere


class PackedClassifier(nn.Module):
    """What the training step drives for ``task: classification``: ``forward(input_ids, decoder_input_ids, labels,
    enc=, dec=)`` like :class:`flasht5.model.T5`, on :class:`FlashT5ForSequenceClassification`'s own modules.

    As transformers' T5ForSequenceClassification: the decoder reads the input shifted right (per document here) and
    the head reads the decoder state at the EOS, the last token of each document. The head runs on every decoder
    token and the loss keeps the EOS positions (labels -100 elsewhere): no data-dependent gather, hence no host
    synchronisation and CUDA-graph friendly; the head is two d_model-wide linears, small next to the decoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # FlashT5ForSequenceClassification (registered: the step's parameters are its own)

    @property
    def backend(self) -> str:
        return self.model.model.backend

    def forward(self, input_ids, decoder_input_ids=None, labels=None, *, enc=None, dec=None) -> ClassifierOutput:
        core, cfg = self.model.model, self.model.config
        encoded = core.encode(input_ids, enc)
        dec = enc if dec is None else dec
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(input_ids, dec, cfg.decoder_start_token_id, cfg.pad_token_id)
        hidden, view = core.decode(decoder_input_ids, encoded, dec)
        logits = self.model.classification_head(hidden)  # (..., tokens, num_labels), inner layout
        inner = view.enter(labels, fill=-100) if labels is not None else None
        loss = None
        if inner is not None:
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), inner.reshape(-1), ignore_index=-100
            )
        flat_labels = inner.reshape(-1) if inner is not None else None
        return ClassifierOutput(loss, None, logits.reshape(-1, logits.shape[-1]), flat_labels)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    return " ".join(text.split())


def generation_metrics(predictions: Sequence[str], references: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """``names`` of ROUGE-1/2/L (``rouge-score``, stemmed, mean F1), corpus BLEU (``sacrebleu``, default 13a
    tokenization) and exact match (after collapsing whitespace), all on a 0-100 scale."""
    out: dict[str, float] = {}
    n = max(len(predictions), 1)
    rouge = [m for m in names if m.startswith("rouge")]
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(rouge, use_stemmer=True)
        sums = dict.fromkeys(rouge, 0.0)
        for p, r in zip(predictions, references):
            scores = scorer.score(r, p)
            for m in rouge:
                sums[m] += scores[m].fmeasure
        out.update({m: 100.0 * v / n for m, v in sums.items()})
    if "bleu" in names:
        import sacrebleu

        out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    if "exact_match" in names:
        out["exact_match"] = 100.0 * sum(_normalize(p) == _normalize(r) for p, r in zip(predictions, references)) / n
    return {m: out[m] for m in names}


def classification_metrics(predicted: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro F1 (the mean over the classes that occur in the truth or the predictions, as scikit-learn's
    ``f1_score(average="macro")``), on a 0-100 scale."""
    p, t = np.asarray(predicted), np.asarray(truth)
    if len(t) == 0:
        return {"accuracy": math.nan, "f1": math.nan}
    f1s = []
    for c in np.union1d(p, t):
        tp = int(((p == c) & (t == c)).sum())
        fp = int(((p == c) & (t != c)).sum())
        fn = int(((p != c) & (t == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": 100.0 * float((p == t).mean()), "f1": 100.0 * float(np.mean(f1s))}


# ----------------------------------------------------------------------------------------------------------------
# The task the loop drives
# ----------------------------------------------------------------------------------------------------------------


def load_task_tokenizer(cfg: FinetuneConfig, texts: Sequence[str]) -> Any:
    """``data.tokenizer`` (trained on ``texts`` if the folder does not exist), or ``model.init_from``'s tokenizer."""
    from flasht5.data.tokenizer import load_tokenizer, train_tokenizer

    d, init = cfg.data, cfg.model.init_from
    if d.tokenizer is None:
        if init.startswith("hf:"):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(init.removeprefix("hf:"))
        return load_tokenizer(init)
    folder = Path(d.tokenizer)
    if not folder.exists():
        log(f"training a {d.vocab_size}-piece SentencePiece tokenizer on the training examples -> {folder}")
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "texts.jsonl"
            with open(src, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
            train_tokenizer([src], folder, vocab_size=d.vocab_size, seed=cfg.train.seed)
    return load_tokenizer(folder)


class FinetuneTask:
    """The data source and the evaluation of a fine-tuning run, for :func:`flasht5.train.loop.train` (the methods
    the loop calls are those of :class:`flasht5.train.loop.PretrainTask`)."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.classification = cfg.task == "classification"
        self.metric_names = cfg.metrics()
        self.best: dict[str, Any] = {}  # {"step", "metric", "value"} of the best evaluation so far
        self.last_predictions: list[dict[str, Any]] = []
        self.last_predictions_path: str | None = None
        self.first_metrics: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}

    # -- data ----------------------------------------------------------------------------------------------------
    def prepare(self) -> Any:
        cfg, d = self.cfg, self.cfg.data
        train = read_examples(d.train, d.input_key, d.target_key, classification=self.classification)
        held = read_examples(d.eval, d.input_key, d.target_key, classification=self.classification) if d.eval else []
        if self.cfg.eval.max_examples is not None:
            held = held[: self.cfg.eval.max_examples]
        texts = [d.prefix + x for x, _ in train] + ([] if self.classification else [y for _, y in train])
        self.tokenizer = load_task_tokenizer(cfg, texts)
        train_cls = held_cls = None
        if self.classification:
            self.labels = label_names([y for _, y in train], d.labels)
            train_cls = label_ids([y for _, y in train], self.labels, "data.train")
            held_cls = label_ids([y for _, y in held], self.labels, "data.eval") if held else None
        self.train_examples, cut = tokenize_examples(self.tokenizer, train, cfg, train_cls)
        log(f"{len(train)} training examples ({cut['inputs_cut']} inputs and {cut['targets_cut']} targets cut to "
            f"data.max_input_len={d.max_input_len} / data.max_target_len={d.max_target_len})")  # fmt: skip
        self.held = held
        self.held_examples = tokenize_examples(self.tokenizer, held, cfg, held_cls)[0] if held else None
        if held:
            log(f"{len(held)} held-out examples")
        return self.tokenizer

    def _dataset(self, examples: Examples, *, seed: int, static: bool, rank: int = 0, world_size: int = 1):
        d = self.cfg.data
        return SFTDataset(
            examples, eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
            max_input_len=d.max_input_len, max_target_len=d.max_target_len, max_tokens=d.max_tokens,
            max_target_tokens=d.max_target_tokens, mode=d.mode, row_len=d.row_len, row_target_len=d.row_target_len,
            seed=seed, max_docs=(d.max_docs or "auto") if static and d.mode == "varlen" else None, rank=rank,
            world_size=world_size,
        )  # fmt: skip

    def train_dataset(self, static: bool, rank: int = 0, world_size: int = 1) -> SFTDataset:
        return self._dataset(self.train_examples, seed=self.cfg.train.seed, static=static, rank=rank,
                             world_size=world_size)  # fmt: skip

    # -- model ---------------------------------------------------------------------------------------------------
    def build_model(self, device: torch.device, *, meta: bool = False) -> nn.Module:
        from flasht5.config import FlashT5Config
        from flasht5.modeling import FlashT5ForSequenceClassification
        from flasht5.train.loop import build_model

        vocab = len(self.tokenizer)
        if not self.classification:
            return build_model(self.cfg, vocab, device, meta=meta)
        if meta:  # FSDP2 builds on the meta device, then allocates each rank's shards
            with torch.device("meta"):
                return self.build_model(torch.device("meta"))
        m = self.cfg.model
        labels = {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                  "label2id": {n: i for i, n in enumerate(self.labels)}}  # fmt: skip
        kwargs = {} if m.attn_implementation is None else {"attn_implementation": m.attn_implementation}
        if m.init_from:
            model = FlashT5ForSequenceClassification.from_pretrained(m.init_from, **labels, **kwargs)
            if model.config.vocab_size < vocab:
                raise ValueError(f"model.init_from has vocab_size {model.config.vocab_size} < the tokenizer's {vocab}")
        else:
            config = FlashT5Config.from_preset(m.preset, **{"vocab_size": -(-vocab // 128) * 128, **m.overrides})
            for k, v in labels.items():
                setattr(config, k, v)
            model = FlashT5ForSequenceClassification(config)
            if m.attn_implementation is not None:
                model.set_attn_implementation(m.attn_implementation)
        model.config.problem_type = "single_label_classification"
        return model.to(device)

    def core(self, model: nn.Module) -> nn.Module:
        return PackedClassifier(model) if self.classification else model.model

    # -- evaluation ----------------------------------------------------------------------------------------------
    @property
    def has_eval(self) -> bool:
        return self.held_examples is not None

    def prepare_eval(self, device: torch.device) -> None:
        self.device = device
        self.eval_batches: list[tuple[list[int], Batch, int]] = []
        if self.held_examples is None:
            return
        ds = self._dataset(self.held_examples, seed=0, static=False)
        for ids, item in ds.in_order():
            self.eval_batches.append((ids, item["batch"].to(device), item["stats"]["target_tokens"]))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, core: nn.Module, autocast: Any, step: int) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            metrics, rows = self._classify(core, autocast) if self.classification else self._generate(model, autocast)
        finally:
            model.train(was)
        out = {"eval_loss": metrics.pop("loss"), **{f"eval_{k}": v for k, v in metrics.items()}}
        if step == 0:
            self.first_metrics = out
        self.last_metrics = out
        self.last_predictions = rows
        if self.cfg.eval.predictions and _main_rank():
            path = Path(self.cfg.train.out_dir) / "predictions" / f"step-{step:07d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.last_predictions_path = str(path)
        return out

    def _loss(self, core: nn.Module, autocast: Any) -> float:
        from flasht5.train.loop import evaluate

        return evaluate(core, [(b, n) for _, b, n in self.eval_batches], autocast)

    def _generate(self, model: nn.Module, autocast: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        loss = self._loss(model.model, autocast)
        e, ex, pad = self.cfg.eval, self.held_examples, self.tokenizer.pad_token_id
        order = sorted(range(len(ex)), key=lambda i: -len(ex.input(i)))  # similar lengths batch together
        predictions: dict[int, str] = {}
        for start in range(0, len(order), e.batch_size):
            ids = order[start : start + e.batch_size]
            longest = max(len(ex.input(i)) for i in ids)
            input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), longest), dtype=torch.long)
            for r, i in enumerate(ids):
                seq = torch.from_numpy(ex.input(i).astype(np.int64))
                input_ids[r, : len(seq)], mask[r, : len(seq)] = seq, 1
            # In the weights' own dtype, as the span-filling samples of pretraining: the static cache takes the
            # encoder output's dtype, which autocast would not give the decoder's keys and values.
            out = model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=e.max_new_tokens, do_sample=False, num_beams=1,
            )  # fmt: skip
            for i, text in zip(ids, self.tokenizer.batch_decode(out, skip_special_tokens=True)):
                predictions[i] = text.strip()
        preds = [predictions[i] for i in range(len(ex))]
        refs = [y for _, y in self.held]
        metrics = {"loss": loss, **generation_metrics(preds, refs, self.metric_names)}
        rows = [{"input": x, "target": y, "prediction": p} for (x, y), p in zip(self.held, preds)]
        return metrics, rows

    def _classify(self, core: nn.Module, autocast: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        losses, predicted, truth, order = [], [], [], []
        for ids, batch, _ in self.eval_batches:
            with autocast():
                out = core(batch.input_ids, None, batch.labels, enc=batch.enc, dec=batch.dec)
            keep = out.labels != -100  # the EOS of each example, in document order
            losses.append(out.loss.float() * len(ids))
            predicted.append(out.logits[keep].argmax(-1))
            truth.append(out.labels[keep])
            order.extend(ids)
        pred = torch.cat(predicted).tolist()
        true = torch.cat(truth).tolist()
        loss = float(torch.stack(losses).sum()) / max(len(order), 1)
        names = self.labels
        rows = [None] * len(self.held)
        for i, p, t in zip(order, pred, true):
            rows[i] = {"input": self.held[i][0], "label": names[t], "prediction": names[p]}
        return {"loss": loss, **classification_metrics(pred, true)}, rows

    # -- best model, state, summary ------------------------------------------------------------------------------
    def after_eval(self, step: int, metrics: dict[str, float], save_model: Any) -> None:
        """Keep the best model in ``<out_dir>/best`` (with ``flasht5_best.json``: step, metric, value)."""
        e = self.cfg.eval
        if not e.keep_best:
            return
        key = "eval_loss" if e.best_metric == "loss" else f"eval_{e.best_metric}"
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            return
        lower = e.best_metric == "loss"
        old = self.best.get("value")
        if old is not None and not (value < old if lower else value > old):
            return
        self.best = {"step": step, "metric": e.best_metric, "value": float(value)}
        info = json.dumps({**self.best, "metrics": metrics}, indent=2)
        save_model(Path(self.cfg.train.out_dir) / "best", extra={"flasht5_best.json": info})
        log(f"step {step}: best {e.best_metric} so far ({value:.4f}); model kept in {self.cfg.train.out_dir}/best")

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "first_metrics": dict(self.first_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best") or {})
        self.first_metrics = dict(state.get("first_metrics") or {})

    def samples(self, model: nn.Module, device: torch.device) -> list[dict[str, Any]]:
        return self.last_predictions[: self.cfg.train.samples]

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.cfg.task,
            "initial_metrics": self.first_metrics,
            "final_metrics": self.last_metrics,
            "best": self.best,
            "predictions": self.last_predictions_path,
        }


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune as configured (:func:`flasht5.train.loop.train` with a :class:`FinetuneTask`); returns the summary."""
    from flasht5.train.loop import train

    return train(cfg, task=FinetuneTask(cfg))


# ----------------------------------------------------------------------------------------------------------------
# The demo task: restore the masked words of King James Bible passages
# ----------------------------------------------------------------------------------------------------------------

DEMO_PREFIX = "restore the masked words: "
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def masked_word_examples(
    corpus: str | Path, n: int, *, seed: int = 0, min_words: int = 10, max_words: int = 24, max_span: int = 3,
    join: bool = False,
) -> list[dict[str, str]]:  # fmt: skip
    """``n`` examples of the demo task from a one-document-per-line text file (``.gz`` too): a passage of
    ``min_words``..``max_words`` words with a span of 1..``max_span`` consecutive words replaced by ``<extra_id_0>``
    (T5's sentinel); the target is the masked words. ``join``: passages run on over the following documents (long
    inputs from chapter-sized documents). Deterministic for a given seed."""
    from flasht5.data.text import iter_file_documents

    docs = [d for d in iter_file_documents(Path(corpus)) if d.strip()]
    rng = np.random.default_rng(seed)
    out: list[dict[str, str]] = []
    while len(out) < n:
        first_doc = int(rng.integers(len(docs)))
        doc = docs[first_doc]
        if join:  # enough following documents for the longest passage
            last = first_doc + 1
            while last < len(docs) and len(doc.split()) < max_words + 1:
                doc, last = doc + " " + docs[last], last + 1
        words = [m for m in _WORD.finditer(doc)]
        k = int(rng.integers(min_words, max_words + 1))
        if len(words) < k + 1:
            continue
        first = int(rng.integers(len(words) - k))
        start, end = words[first].start(), words[first + k - 1].end()
        span = int(rng.integers(1, max_span + 1))
        at = first + int(rng.integers(k - span + 1))
        lo, hi = words[at].start(), words[at + span - 1].end()
        passage = doc[start:lo] + "<extra_id_0>" + doc[hi:end]
        out.append({"input": " ".join(passage.split()), "target": " ".join(doc[lo:hi].split())})
    return out


def write_demo_data(out_dir: str | Path, corpus_dir: str | Path = "data/corpus", *, train: int = 6000,
                    held: int = 200, long: bool = False) -> list[Path]:  # fmt: skip
    """The demo's ``train.jsonl.gz`` (from the training chapters) and ``eval.jsonl.gz`` (from the held-out ones),
    byte-identical on every rebuild (gzip mtime 0). ``long``: the long-input variant of ``configs/finetune/long.yaml``
    (passages of 5000-11000 words, about 8k-16k tokens, over consecutive chapters)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = dict(min_words=5000, max_words=11000, join=True) if long else {}
    paths = []
    for name, src, n, seed in (("train", "kjv_train.txt.gz", train, 0), ("eval", "kjv_heldout.txt.gz", held, 1)):
        rows = masked_word_examples(Path(corpus_dir) / src, n, seed=seed, **sizes)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path = out_dir / f"{name}.jsonl.gz"
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(data)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flasht5.train.finetune", description="Build the demo task's data.")
    parser.add_argument("out", nargs="?", default=None, help="output folder (default: configs/finetune/demo_data, "
                        "with --long runs/finetune-long/data)")  # fmt: skip
    parser.add_argument("--long", action="store_true", help="the long-input variant for configs/finetune/long.yaml")
    parser.add_argument("--corpus", default="data/corpus", help="folder of kjv_train.txt.gz and kjv_heldout.txt.gz")
    args = parser.parse_args(argv)
    out = args.out or ("runs/finetune-long/data" if args.long else "configs/finetune/demo_data")
    kw = dict(train=256, held=16, long=True) if args.long else {}
    for p in write_demo_data(out, args.corpus, **kw):
        print(p, os.path.getsize(p), "bytes")


if __name__ == "__main__":
    main()
