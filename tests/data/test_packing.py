"""Packing: batch contract (varlen and padded), no cross-document attention, no token lost, determinism,
state_dict restore (in process and with DataLoader workers), disjoint rank shards, denoiser proportions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flasht5.data.packing import ResumableLoader, UL2Dataset, collate_plain, eval_examples
from flasht5.data.store import TokenStore, build_store
from flasht5.data.ul2 import PRESETS, merge_denoised
from flasht5.layout import Batch, shift_right

VOCAB = 1 << 22
SENTINELS = np.arange(VOCAB - 1, VOCAB - 101, -1)
PREFIX = {"[R]": [3], "[S]": [4], "[X]": [5]}
EOS = 1


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> TokenStore:
    """150 documents of 1..1000 tokens; every token id is unique, so it names its document and position."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=150)
    lengths[:5] = [1, 2, 3, 567, 568]
    starts = 100 + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    docs = [np.arange(s, s + n) for s, n in zip(starts, lengths)]
    return build_store(tmp_path_factory.mktemp("store"), docs, vocab_size=VOCAB)


def _ds(store: TokenStore, **kw) -> UL2Dataset:
    args = dict(
        denoisers="ul2",
        sentinel_ids=SENTINELS,
        prefix_ids=PREFIX,
        eos_id=EOS,
        max_input_len=128,
        max_target_len=64,
        max_tokens=1024,
        seed=1,
    )
    args.update(kw)
    return UL2Dataset(store, **args)


def _doc_of(store: TokenStore) -> tuple[np.ndarray, np.ndarray]:
    """Token id -> (document, position) lookup tables."""
    starts = 100 + np.asarray(store.offsets[:-1])
    return starts, np.asarray(store.lengths)


def _source(ds: UL2Dataset, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Original chunk of one example: strip mode prefix and EOS, put the spans back."""
    assert enc[-1] == EOS and dec[-1] == EOS
    n_prefix = 1 if enc[0] in (3, 4, 5) else 0
    return merge_denoised(enc[:-1], dec[:-1], SENTINELS, n_prefix)


def _varlen_examples(item: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    b = item["batch"]
    cu, dcu = b.enc.cu_seqlens.numpy(), b.dec.cu_seqlens.numpy()
    ids, labels = b.input_ids[0].numpy(), b.labels[0].numpy()
    n = item["stats"]["examples"]  # static batches end with padding documents
    return [(ids[cu[i] : cu[i + 1]], labels[dcu[i] : dcu[i + 1]]) for i in range(n)]


def _padded_examples(item: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    b = item["batch"]
    out = []
    for r in range(b.input_ids.shape[0]):
        seg, dseg = b.enc.segment_ids[r].numpy(), b.dec.segment_ids[r].numpy()
        for s in range(1, int(seg.max()) + 1):
            out.append((b.input_ids[r].numpy()[seg == s], b.labels[r].numpy()[dseg == s]))
    return out


def _collect_epoch(ds: UL2Dataset, batches) -> dict[int, list[tuple[int, np.ndarray]]]:
    """doc -> [(start position, chunk tokens)] over all examples of the batches."""
    starts, lengths = _doc_of(ds.store)
    got: dict[int, list] = {}
    for batch in batches:
        exs = _varlen_examples(batch) if ds.mode == "varlen" else _padded_examples(batch)
        for enc, dec in exs:
            chunk = _source(ds, enc, dec)
            doc = int(np.searchsorted(starts, chunk[0], side="right") - 1)
            pos = int(chunk[0] - starts[doc])
            # One contiguous slice of one document: nothing of another document is in this example.
            np.testing.assert_array_equal(chunk, starts[doc] + pos + np.arange(len(chunk)))
            assert pos + len(chunk) <= lengths[doc]
            got.setdefault(doc, []).append((pos, chunk))
    return got


@pytest.mark.parametrize("mode", ["varlen", "padded"])
@pytest.mark.parametrize("mixture", ["t5", "ul2", "fat5"])
def test_one_epoch_loses_no_token_and_never_mixes_documents(store, mode, mixture) -> None:
    ds = _ds(store, denoisers=mixture, mode=mode, epochs=1)
    batches = list(ds)
    got = _collect_epoch(ds, batches)
    assert sorted(got) == list(range(len(store)))
    for doc, chunks in got.items():
        chunks.sort(key=lambda c: c[0])
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), store[doc])  # every token, once
    raw = sum(b["stats"]["raw_tokens"] for b in batches)
    assert raw == store.num_tokens and all(b["stats"]["discarded_tokens"] == 0 for b in batches)


def test_varlen_contract(store) -> None:
    ds = _ds(store)
    for item in [b for _, b in zip(range(8), ds)]:
        batch = item["batch"]
        assert isinstance(batch, Batch) and batch.enc.kind == batch.dec.kind == "varlen"
        cu, dcu = batch.enc.cu_seqlens, batch.dec.cu_seqlens
        assert cu.dtype == torch.int32 and dcu.dtype == torch.int32 and cu[0] == 0 and dcu[0] == 0
        assert len(cu) == len(dcu) == item["stats"]["examples"] + 1
        assert batch.input_ids.shape == (1, int(cu[-1])) and batch.input_ids.dtype == torch.int64
        assert batch.labels.shape == (1, int(dcu[-1])) and batch.decoder_input_ids is None
        assert batch.enc.max_seqlen == int((cu[1:] - cu[:-1]).max()) <= ds.max_input_len
        assert batch.dec.max_seqlen == int((dcu[1:] - dcu[:-1]).max()) <= ds.max_target_len
        assert int(cu[-1]) <= ds.max_tokens and int(dcu[-1]) <= ds.max_target_tokens
        labels = batch.labels[0]
        dec_in = shift_right(batch.labels, batch.dec, start_id=0, pad_id=0)[0]  # what the model feeds the decoder
        for i in range(len(dcu) - 1):
            a, b = int(dcu[i]), int(dcu[i + 1])
            assert dec_in[a] == 0 and torch.equal(dec_in[a + 1 : b], labels[a : b - 1])
            assert labels[b - 1] == EOS
        assert all(isinstance(v, (int, float)) for v in item["stats"].values())


def test_static_varlen_batches_have_one_shape_and_the_same_examples(store) -> None:
    """max_docs: every batch has the budgets' token counts and max_docs documents; the examples are the
    dynamic batches' own, followed by padding documents (labels -100) no longer than the per-example limits."""
    ds, st = _ds(store, epochs=1), _ds(store, epochs=1, max_docs=40)
    shapes = set()
    for dyn, fix in zip(ds, st):
        b = fix["batch"]
        shapes.add((b.input_ids.shape, b.labels.shape, b.enc.cu_seqlens.shape, b.dec.cu_seqlens.shape))
        assert (b.enc.max_seqlen, b.dec.max_seqlen) == (ds.max_input_len, ds.max_target_len)
        n = fix["stats"]["examples"]
        assert n + max(-(-(ds.max_tokens - int(b.enc.cu_seqlens[n])) // ds.max_input_len), 0) <= 40
        ex = _varlen_examples(fix)
        assert all(np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]) for a, c in zip(ex, _varlen_examples(dyn)))
        cu, dcu = b.enc.cu_seqlens, b.dec.cu_seqlens
        assert int((cu.diff()).max()) <= ds.max_input_len and int((dcu.diff()).max()) <= ds.max_target_len
        assert torch.all(b.labels[0, int(dcu[n]) :] == -100) and torch.all(b.input_ids[0, int(cu[n]) :] == 0)
    assert shapes == {((1, ds.max_tokens), (1, ds.max_target_tokens), (41,), (41,))}
    with pytest.raises(ValueError, match="max_docs"):
        _ds(store, max_docs=4)


def test_static_varlen_room_follows_the_tail_a_bin_leaves(store) -> None:
    """max_docs counts a bin's examples plus the padding documents of *its* unused tail: a full bin needs few
    padding documents, so it holds more examples than the room an empty bin's tail would leave (max_docs minus the
    8 padding documents of an empty 1024-token budget of 128-token documents), and fills its budget better."""
    ds = _ds(store, epochs=1, max_docs=14)
    tail_empty = max(-(-ds.max_tokens // ds.max_input_len), -(-ds.max_target_tokens // ds.max_target_len))
    counts, fills = [], []
    for item in ds:
        b, n = item["batch"], item["stats"]["examples"]
        used_e, used_d = int(b.enc.cu_seqlens[n]), int(b.dec.cu_seqlens[n])
        tail = max(
            -(-(ds.max_tokens - used_e) // ds.max_input_len), -(-(ds.max_target_tokens - used_d) // ds.max_target_len)
        )
        assert n + tail <= ds.max_docs and b.enc.cu_seqlens.shape == (ds.max_docs + 1,)
        counts.append(n)
        fills.append(item["stats"]["input_fill"])
    assert max(counts) > ds.max_docs - tail_empty
    assert np.mean(fills) > 0.8


def test_padded_contract(store) -> None:
    ds = _ds(store, mode="padded", max_tokens=1024, row_len=256)  # 4 rows of 256 / row_target_len
    ld = ds.row_target_len
    multi = 0
    for item in [b for _, b in zip(range(8), ds)]:
        batch = item["batch"]
        assert batch.input_ids.shape == (4, 256) and batch.labels.shape == (4, ld)
        assert batch.enc.kind == batch.dec.kind == "packed"
        seg, dseg = batch.enc.segment_ids, batch.dec.segment_ids
        multi += int((seg.amax(1) >= 2).sum())
        assert torch.equal(batch.labels == -100, dseg == 0)
        pos, dpos = batch.enc.positions(), batch.dec.positions()
        dec_in = shift_right(batch.labels, batch.dec, start_id=0, pad_id=0)
        for r in range(4):
            k = int(seg[r].max())
            assert int(dseg[r].max()) == k  # decoder segment s belongs to encoder segment s of the same row
            for s in range(1, k + 1):
                idx, didx = torch.nonzero(seg[r] == s)[:, 0], torch.nonzero(dseg[r] == s)[:, 0]
                assert torch.equal(idx, torch.arange(idx[0], idx[0] + len(idx)))  # contiguous
                assert torch.equal(pos[r, idx], torch.arange(len(idx)))  # positions restart per document
                assert torch.equal(dpos[r, didx], torch.arange(len(didx)))
                lab, din = batch.labels[r, didx], dec_in[r, didx]
                assert din[0] == 0 and torch.equal(din[1:], lab[:-1])
            # Padding only after the last example.
            assert torch.all(seg[r, int((seg[r] > 0).sum()) :] == 0)
        st = item["stats"]
        assert st["input_padding"] == int((seg == 0).sum()) and st["padding_frac"] == st["input_padding"] / (4 * 256)
    assert multi > 8  # rows do hold several examples


def test_varlen_budget_is_filled(store) -> None:
    for mixture in ("t5", "ul2"):
        ds = _ds(store, denoisers=mixture, max_input_len=512, max_target_len=128, max_tokens=4096)
        fills = [b["stats"]["input_fill"] for _, b in zip(range(40), ds)]
        assert np.mean(fills) > 0.98, (mixture, np.mean(fills))


def test_determinism_and_seed(store) -> None:
    a = [b["batch"].input_ids for _, b in zip(range(5), _ds(store))]
    b = [b["batch"].input_ids for _, b in zip(range(5), _ds(store))]
    c = [b["batch"].input_ids for _, b in zip(range(5), _ds(store, seed=2))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def _tensors(b: Batch) -> list:
    lays = [(lo.kind, lo.max_seqlen, lo.cu_seqlens, lo.segment_ids) for lo in (b.enc, b.dec)]
    return [b.input_ids, b.labels, *[x for lay in lays for x in lay]]


def _same(xs: list[dict], ys: list[dict]) -> bool:
    eq = lambda a, b: torch.equal(a, b) if torch.is_tensor(a) else a == b
    return len(xs) == len(ys) and all(
        all(eq(a, b) for a, b in zip(_tensors(x["batch"]), _tensors(y["batch"]))) and x["stats"] == y["stats"]
        for x, y in zip(xs, ys)
    )


@pytest.mark.parametrize("mode", ["varlen", "padded"])
def test_state_dict_restores_the_exact_stream(store, mode) -> None:
    # A small budget makes the epoch end within the run, so the restore crosses an epoch boundary too.
    ds = _ds(store, mode=mode)
    it = iter(ds)
    for _ in range(37):
        next(it)
    state = ds.state_dict()
    assert state["shards"][0]["pool"], "the test should restore a non-empty pool"
    expected = [next(it) for _ in range(200)]
    assert expected[-1]["stats"]["epoch"] >= 1
    ds2 = _ds(store, mode=mode)
    ds2.load_state_dict(state)
    assert _same(expected, [b for _, b in zip(range(200), ds2)])
    with pytest.raises(ValueError, match="another store"):
        _ds(store, mode=mode, seed=9).load_state_dict(state)


def test_resumable_loader_with_workers(store) -> None:
    loader = ResumableLoader(_ds(store), num_workers=2)
    it = iter(loader)
    for _ in range(7):  # odd: the next batch is due from worker 1
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(12)]
    del it
    loader2 = ResumableLoader(_ds(store), num_workers=2)
    loader2.load_state_dict(state)
    assert loader2.state_dict() == state  # saving again before iterating keeps the loaded position
    assert _same(expected, [b for _, b in zip(range(12), loader2)])
    assert "_state" not in expected[0]
    with pytest.raises(ValueError, match="workers"):
        ResumableLoader(_ds(store), num_workers=3).load_state_dict(state)


def test_ranks_and_workers_read_disjoint_documents(store) -> None:
    seen = []
    for rank in range(2):
        loader = ResumableLoader(_ds(store, rank=rank, world_size=2, epochs=1), num_workers=2)
        seen.append(_collect_epoch(loader.dataset, list(loader)))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(set(seen[0]) | set(seen[1])) == list(range(len(store)))
    # A document is corrupted the same way whatever the sharding.
    single = _collect_epoch(_ds(store, epochs=1), list(_ds(store, epochs=1)))
    for doc in (0, 77, 149):
        part = seen[0].get(doc) or seen[1][doc]
        assert sorted(p for p, _ in part) == sorted(p for p, _ in single[doc])


@pytest.mark.parametrize("mixture", ["ul2", "fat5"])
def test_sampled_denoiser_proportions(tmp_path, mixture) -> None:
    # Many 3-token documents: one chunk (one denoiser draw) each, cheap to corrupt.
    many = build_store(tmp_path / "many", [[7, 8, 9]] * 6000, vocab_size=VOCAB)
    ds = _ds(many, denoisers=mixture, epochs=1)
    counts = np.zeros(len(ds.denoisers))
    for batch in ds:
        counts += [batch["stats"][f"denoiser_{i}"] for i in range(len(ds.denoisers))]
    n = counts.sum()
    p = np.array([w for _, w in PRESETS[mixture]])
    assert n == 6000
    assert np.all(np.abs(counts - n * p) <= 4 * np.sqrt(n * p * (1 - p))), (counts / n, p)


def test_plain_collate_and_eval_examples(store) -> None:
    kw = dict(denoisers="t5", sentinel_ids=SENTINELS, eos_id=EOS, max_input_len=128, max_target_len=64)
    exs = eval_examples(store, num_examples=6, **kw)
    assert len(exs) == 6 and all(
        np.array_equal(a[0], b[0]) for a, b in zip(exs, eval_examples(store, num_examples=6, **kw))
    )
    batch = collate_plain(exs)
    assert batch["input_ids"].shape == (6, max(len(e) for e, _ in exs))
    for i, (enc, tgt) in enumerate(exs):
        assert batch["attention_mask"][i].sum() == len(enc) and torch.all(batch["labels"][i, len(tgt) :] == -100)
        assert torch.equal(batch["labels"][i, : len(tgt)], torch.as_tensor(tgt)) and "decoder_input_ids" not in batch


def test_bad_arguments(store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prefix_ids"):
        _ds(store, prefix_ids={"[R]": [3]})
    with pytest.raises(ValueError, match="mode"):
        _ds(store, mode="ragged")
    with pytest.raises(ValueError, match="max_tokens"):
        _ds(store, max_tokens=64)
    with pytest.raises(ValueError, match="rank"):
        _ds(store, rank=2, world_size=2)
    tiny = build_store(tmp_path / "tiny", [[5, 6, 7]], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="fewer than"):
        next(iter(_ds(tiny, world_size=2, rank=1)))


def test_end_to_end_from_tokenizer(tmp_path, corpus_file, tiny_tokenizer_dir) -> None:
    from flasht5.data.store import pretokenize
    from flasht5.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    pretokenize([corpus_file], tiny_tokenizer_dir, tmp_path / "st", progress=False)
    st = TokenStore(tmp_path / "st")
    ds = UL2Dataset.from_tokenizer(
        st, tok, denoisers="ul2", max_input_len=256, max_target_len=128, max_tokens=2048, epochs=1, shuffle=False
    )
    assert ds.eos_id == tok.eos_token_id == 1 and ds.pad_id == tok.pad_token_id == 0
    batch = next(iter(ds))
    enc, dec = _varlen_examples(batch)[0]
    assert tok.convert_ids_to_tokens(int(enc[0])) in ("[R]", "[S]", "[X]")  # the mode token leads the input
    restored = merge_denoised(enc[:-1], dec[:-1], ds.sentinel_ids, 1)
    assert ds.sentinel_ids[0] == len(tok) - 1
    assert any(tok.decode(restored) in tok.decode(st[i]) for i in range(len(st)))  # a piece of a real chapter


@pytest.mark.parametrize("mode", ["varlen", "padded"])
def test_example_keys_name_each_batch_example_exactly(store: TokenStore, mode: str) -> None:
    """emit_example_keys: every item's "examples" key [epoch, document, chunk] regenerates the batch's examples in
    batch order, across an epoch boundary and with two ranks; off by default."""
    kw = dict(row_len=256, row_target_len=160) if mode == "padded" else {}
    assert "examples" not in next(iter(_ds(store, mode=mode, **kw)))
    docs = {}  # rank -> documents of epoch 0
    for rank in (0, 1):
        ds = _ds(store, mode=mode, rank=rank, world_size=2, **kw)
        ds.emit_example_keys = True
        epochs = set()
        for n, item in enumerate(ds):
            got = _varlen_examples(item) if mode == "varlen" else _padded_examples(item)
            keys = item["examples"]
            assert len(keys) == len(got) == item["stats"]["examples"]
            for (epoch, doc, chunk), (enc, dec) in zip(keys, got):
                want_enc, want_dec, _, _ = ds._doc_examples(epoch, doc)[chunk]
                np.testing.assert_array_equal(enc, want_enc)
                np.testing.assert_array_equal(dec, want_dec)
                epochs.add(epoch)
                if epoch == 0:
                    docs.setdefault(rank, set()).add(doc)
            if len(epochs) > 1 and n > 3:
                break
        assert epochs == {0, 1}
    assert not docs[0] & docs[1]  # store indices of disjoint shards
