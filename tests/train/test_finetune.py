"""Supervised fine-tuning (src/flasht5/train/finetune.py through the one loop in loop.py): reading examples, packing
them into the pretraining batches, classification on packed batches, metrics, a short demo run whose loss drops,
best/ and predictions, exact resume, TensorBoard event files, a stock Hugging Face T5 folder as the start."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flasht5.train.config import FinetuneConfig, load_config
from flasht5.train.finetune import (
    Examples,
    PackedClassifier,
    SFTDataset,
    classification_metrics,
    expand_example_inputs,
    generation_metrics,
    masked_word_examples,
    read_examples,
    write_demo_data,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "finetune" / "demo.yaml")
TINY = "{d_model: 32, d_kv: 16, d_ff: 64, num_layers: 1, num_heads: 2, dropout_rate: 0.1}"
TIMING = ("tokens_per_s", "graphed")  # the only fields of a metrics row that may differ between identical runs
HAVE_ROUGE_BLEU = all(__import__("importlib").util.find_spec(m) for m in ("rouge_score", "sacrebleu"))
METRICS = "[rougeL, exact_match, bleu]" if HAVE_ROUGE_BLEU else "[exact_match]"
HAVE_TENSORBOARD = __import__("importlib").util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Examples of the demo task (from 60 training chapters), class-labelled examples, and a tokenizer."""
    from flasht5.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ft")
    with gzip.open(ROOT / "data" / "corpus" / "kjv_train.txt.gz", "rt", encoding="utf-8") as f:
        docs = [next(f) for _ in range(60)]
    (root / "kjv.txt").write_text("".join(docs))
    rows = masked_word_examples(root / "kjv.txt", 400, seed=0)
    for name, part in (("train", rows[:360]), ("eval", rows[360:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        # classification: does the passage mention the LORD?
        cls = [{"text": r["input"], "label": "lord" if "LORD" in r["input"] else "other"} for r in part]
        (root / f"{name}_cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cls))
    train_tokenizer([root / "kjv.txt"], root / "tok", vocab_size=300, character_coverage=1.0)
    return root


def _cfg(shared: Path, out: Path, steps: int, *extra: str, task: str = "seq2seq") -> FinetuneConfig:
    data = (
        [f"--data.train=[{shared / 'train_cls.jsonl'}]", f"--data.eval=[{shared / 'eval_cls.jsonl'}]",
         "--data.input_key=text", "--data.target_key=label", "--eval.metrics=null", "--eval.best_metric=accuracy"]
        if task == "classification"
        else [f"--data.train=[{shared / 'train.jsonl'}]", f"--data.eval=[{shared / 'eval.jsonl'}]",
              f"--eval.metrics={METRICS}"]
    )  # fmt: skip
    return load_config(
        DEMO,
        [
            f"--task={task}", f"--train.out_dir={out}", f"--data.tokenizer={shared / 'tok'}", *data,
            f"--train.steps={steps}", "--data.max_tokens=256", "--data.max_input_len=48", "--data.max_target_len=8",
            f"--model.overrides={TINY}", "--optim.warmup_steps=2", "--train.eval_every=5", "--train.log_every=2",
            "--train.save_every=4", "--train.keep_checkpoints=3", "--train.samples=2", "--train.progress=false",
            "--train.device=cpu", "--eval.max_examples=12", "--eval.max_new_tokens=4", "--eval.batch_size=8",
            *extra,
        ],
        schema=FinetuneConfig,
    )  # fmt: skip


def _run(shared: Path, out: Path, steps: int, *extra: str, task: str = "seq2seq") -> dict:
    from flasht5.train.finetune import finetune

    return finetune(_cfg(shared, out, steps, *extra, task=task))


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Reading examples
# ---------------------------------------------------------------------------------------------------------------


def test_examples_are_read_from_jsonl_csv_tsv_gzip_and_datasets_folders(tmp_path: Path) -> None:
    rows = [{"q": "one, two", "a": "three"}, {"q": 'say "hi"', "a": "x"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[0]) + "\n")
    for name, delim in (("c.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["q", "a"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    want = [(r["q"], r["a"]) for r in rows]
    assert read_examples([tmp_path / "a.jsonl"], "q", "a") == want
    assert read_examples([tmp_path / "b.jsonl.gz"], "q", "a") == want[:1]
    assert read_examples([tmp_path / "c.csv", tmp_path / "d.tsv"], "q", "a") == want + want
    assert read_examples([tmp_path / "ds"], "q", "a") == want
    assert [p.name for p in expand_example_inputs([str(tmp_path / "*.jsonl*")])] == ["a.jsonl", "b.jsonl.gz"]
    assert read_examples([tmp_path / "a.jsonl"], "q", "a", classification=True) == want


def test_example_mistakes_name_the_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"q": "x", "a": "y"}\n{"q": "x"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl line 2 has no field 'a' \(its fields: \['q'\]\)"):
        read_examples([tmp_path / "a.jsonl"], "q", "a")
    (tmp_path / "b.jsonl").write_text('{"q": "x", "a": 3}\n')
    with pytest.raises(ValueError, match="field 'a' must be text, got 3"):
        read_examples([tmp_path / "b.jsonl"], "q", "a")
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="is not an examples file"):
        expand_example_inputs([tmp_path / "c.txt"])
    import datasets

    ds = datasets.Dataset.from_list([{"q": "x", "a": "y"}])
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['test', 'train'\]: give one split's folder"):
        read_examples([tmp_path / "dd"], "q", "a")


def test_finetune_config_mistakes_name_the_key(shared: Path, tmp_path: Path) -> None:
    for override, match in (
        ("--task=regression", "task must be one of"),
        ("--eval.metrics=[rougeL, meteor]", "eval.metrics must be one of"),
        ("--eval.best_metric=accuracy", "eval.best_metric must be one of"),
        ("--data.labels=[a, b]", "data.labels applies to task=classification only"),
        ("--data.max_tokens=16", "data.max_tokens must be >= 48"),
        ("--data.row_len=64", "apply to data.mode=padded only"),
        ("--data.train=[nope.jsonl]", "data.train: input 'nope.jsonl' does not exist"),
        ("--eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("--train.stpes=3", "did you mean 'stpes' -> 'steps'"),
    ):
        with pytest.raises(ValueError, match=match):
            _cfg(shared, tmp_path / "o", 2, override)
    with pytest.raises(ValueError, match="data.tokenizer is null and there is no model.init_from"):
        _cfg(shared, tmp_path / "o", 2, "--data.tokenizer=null")


def test_demo_data_is_the_builders_output_and_the_task_is_as_described(tmp_path: Path) -> None:
    shipped = ROOT / "configs" / "finetune" / "demo_data"
    for built in write_demo_data(tmp_path, ROOT / "data" / "corpus"):
        assert built.read_bytes() == (shipped / built.name).read_bytes(), built.name
    rows = read_examples([shipped / "train.jsonl.gz"], "input", "target")
    assert len(rows) == 6000
    for x, y in rows[:200]:
        assert x.count("<extra_id_0>") == 1 and 1 <= len(y.split()) <= 3 and "<extra_id" not in y


# ---------------------------------------------------------------------------------------------------------------
# Packing: the pretraining batches, every example once, exact resume
# ---------------------------------------------------------------------------------------------------------------


def _examples(n: int, seed: int = 0, classification: bool = False) -> Examples:
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(2, 90, size=int(rng.integers(1, 40))).astype(np.int32) for _ in range(n)]
    inputs = [np.append(x, 1).astype(np.int32) for x in inputs]
    if classification:
        return Examples(inputs, None, rng.integers(0, 3, size=n), np.array([len(x) for x in inputs]))
    targets = [np.append(rng.integers(2, 90, size=int(rng.integers(1, 10))), 1).astype(np.int32) for _ in range(n)]
    return Examples(inputs, targets, None, np.array([len(x) + len(y) for x, y in zip(inputs, targets)]))


def _docs(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    cu, dcu = batch.enc.cu_seqlens.tolist(), batch.dec.cu_seqlens.tolist()
    ids, labels = batch.input_ids[0].tolist(), batch.labels[0].tolist()
    out = []
    for i in range(len(cu) - 1):
        x, y = tuple(ids[cu[i] : cu[i + 1]]), tuple(labels[dcu[i] : dcu[i + 1]])
        if x and x[-1] == 1:  # a real example (padding documents hold pad ids and -100 labels)
            out.append((x, y))
    return out


@pytest.mark.parametrize("classification", [False, True])
def test_static_varlen_batches_hold_every_example_once_per_epoch(classification: bool) -> None:
    ex = _examples(300, classification=classification)
    ds = SFTDataset(ex, eos_id=1, pad_id=0, max_input_len=48, max_target_len=12, max_tokens=256, seed=3, epochs=1,
                    max_docs="auto")  # fmt: skip
    seen, shapes = [], set()
    for item in ds:
        b = item["batch"]
        shapes.add((b.input_ids.shape, b.labels.shape, b.enc.cu_seqlens.shape, b.dec.cu_seqlens.shape))
        assert b.enc.kind == b.dec.kind == "varlen"
        seen.extend(_docs(b))
    assert len(shapes) == 1  # static: one CUDA graph replays every step
    want = sorted((tuple(ex.input(i).tolist()), tuple(ex.target(i).tolist())) for i in range(len(ex)))
    assert sorted(seen) == want
    if classification:  # the class id sits at the EOS, -100 before it; decoder documents are the encoder's
        assert all(y[-1] in (0, 1, 2) and set(y[:-1]) <= {-100} and len(x) == len(y) for x, y in seen)


def test_padded_mode_packs_rows_with_segment_ids() -> None:
    ex = _examples(100)
    ds = SFTDataset(ex, eos_id=1, pad_id=0, max_input_len=48, max_target_len=12, max_tokens=192, mode="padded",
                    row_len=96, epochs=1, seed=0)  # fmt: skip
    n = 0
    for item in ds:
        b = item["batch"]
        assert b.enc.kind == "packed" and b.input_ids.shape == (2, 96)
        n += item["stats"]["examples"]
    assert n == len(ex)


def test_dataset_state_resumes_the_stream_exactly() -> None:
    ex = _examples(200)
    make = lambda: SFTDataset(ex, eos_id=1, pad_id=0, max_input_len=48, max_target_len=12, max_tokens=128, seed=5)
    ds = make()
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(ds.state_dict()))
    want = [_docs(next(it)["batch"]) for _ in range(20)]  # crosses into the next epoch
    again = make()
    again.load_state_dict(state)
    it2 = iter(again)
    assert [_docs(next(it2)["batch"]) for _ in range(20)] == want
    other = SFTDataset(_examples(200, seed=1), eos_id=1, pad_id=0, max_input_len=48, max_target_len=12,
                       max_tokens=128, seed=5)  # fmt: skip
    with pytest.raises(ValueError, match="another store"):
        other.load_state_dict(state)


def test_packed_classifier_matches_the_hf_head_row_by_row() -> None:
    """The packed path (every example a varlen document) gives the logits FlashT5ForSequenceClassification's own
    forward gives each example alone, and the loss is their cross-entropy."""
    from flasht5 import FlashT5Config
    from flasht5.modeling import FlashT5ForSequenceClassification

    torch.manual_seed(0)
    cfg = FlashT5Config.from_preset("demo", vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    num_labels=3, dropout_rate=0.0)  # fmt: skip
    model = FlashT5ForSequenceClassification(cfg).eval()
    ex = _examples(6, classification=True)
    ds = SFTDataset(ex, eos_id=1, pad_id=0, max_input_len=48, max_target_len=48, max_tokens=512, epochs=1)
    (ids, item), *_ = list(ds.in_order())
    b = item["batch"]
    with torch.no_grad():
        out = PackedClassifier(model)(b.input_ids, None, b.labels, enc=b.enc, dec=b.dec)
        keep = out.labels != -100
        packed = out.logits[keep]
        rows = torch.cat([model(input_ids=torch.from_numpy(ex.input(i).astype(np.int64))[None]).logits for i in ids])
    torch.testing.assert_close(packed, rows, rtol=1e-4, atol=1e-5)
    truth = torch.as_tensor(ex.classes[ids])
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(rows, truth), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def test_exact_match_and_classification_metrics() -> None:
    got = generation_metrics(["a  b", "c", ""], ["a b", "d", "e"], ["exact_match"])
    assert got == {"exact_match": pytest.approx(100 / 3)}
    m = classification_metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0])
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    # per-class F1: 0: p=1/2 r=1/2 -> 1/2; 1: p=1 r=1/2 -> 2/3; 2: p=2/3 r=1 -> 4/5 (scikit-learn's macro F1)
    assert m["f1"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 4 / 5) / 3)


def test_rouge_and_bleu_come_from_their_libraries() -> None:
    pytest.importorskip("rouge_score")
    pytest.importorskip("sacrebleu")
    refs = ["the cat sat on the mat today", "a b c d e"]
    same = generation_metrics(refs, refs, ["rougeL", "bleu", "rouge1"])
    assert same["rougeL"] == pytest.approx(100) and same["bleu"] == pytest.approx(100)
    half = generation_metrics(["the cat sat", "x y"], refs, ["rougeL", "bleu"])
    # ROUGE-L F of "the cat sat" vs the 7-word reference: p = 1, r = 3/7 -> 0.6; the second pair shares nothing
    assert half["rougeL"] == pytest.approx(100 * 0.6 / 2) and 0 <= half["bleu"] < 100


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(shared: Path) -> Path:
    """An uninterrupted 10-step seq2seq run with dropout 0.1: checkpoints at 4, 8, 10, best/, final/."""
    out = shared / "finished"
    _run(shared, out, 10)
    return out


def test_short_demo_run_learns_and_writes_metrics_predictions_and_best(shared: Path, tmp_path: Path) -> None:
    """The demo config itself (its task, data and prefix), shortened: the held-out loss drops and every metric is
    computed at every evaluation; predictions, best/ and final/ are written."""
    out = tmp_path / "demo"
    summary = load_and_run_demo(shared, out)
    rows = _rows(out)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    names = ["eval_loss"] + [f"eval_{m}" for m in json.loads(json.dumps(METRICS.strip("[]").split(", ")))]
    assert all(set(names) <= set(r) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    train = [r["loss"] for r in rows if "loss" in r]
    assert train[-1] < train[0]
    preds = [json.loads(line) for line in (out / "predictions" / "step-0000030.jsonl").read_text().splitlines()]
    assert len(preds) == 24 and set(preds[0]) == {"input", "target", "prediction"}
    assert summary["predictions"] == str(out / "predictions" / "step-0000030.jsonl")
    best = json.loads((out / "best" / "flasht5_best.json").read_text())
    assert best["metric"] == "loss" and best["step"] == 30 and summary["best"]["step"] == 30
    assert (out / "best" / "tokenizer.json").is_file() and (out / "final" / "model.safetensors").is_file()
    assert summary["final_metrics"] == {k: v for k, v in evals[-1].items() if k != "step"}


def load_and_run_demo(shared: Path, out: Path) -> dict:
    from flasht5.train.finetune import finetune

    cfg = load_config(
        DEMO,
        [
            f"--train.out_dir={out}", f"--data.tokenizer={shared / 'tok'}", "--train.steps=30", "--train.eval_every=15",
            "--data.max_tokens=384", f"--model.overrides={TINY}", "--optim.lr=0.02", "--optim.warmup_steps=5",
            "--eval.max_examples=24", "--eval.max_new_tokens=4", "--eval.best_metric=loss", f"--eval.metrics={METRICS}",
            "--train.save_every=0", "--train.progress=false", "--train.device=cpu", "--train.samples=1",
        ],
        schema=FinetuneConfig,
    )  # fmt: skip
    assert cfg.data.prefix == "restore the masked words: "
    return finetune(cfg)


def test_tensorboard_event_files_have_the_expected_tags(finished: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(finished / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/exact_match"}
    assert want <= tags, tags
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 5, 10]
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10]
    rows = {r["step"]: r for r in _rows(finished) if "eval_loss" in r}
    assert [e.value for e in acc.Scalars("eval/loss")] == pytest.approx([rows[s]["eval_loss"] for s in (0, 5, 10)])


def test_tensorboard_off_writes_no_event_files(shared: Path, tmp_path: Path) -> None:
    _run(shared, tmp_path / "o", 2, "--log.tensorboard=false", "--train.eval_every=100", "--train.samples=0")
    assert not (tmp_path / "o" / "tensorboard").exists()


class Stop(Exception):
    pass


def test_stopped_and_resumed_finetune_reproduces_the_uninterrupted_run(shared, finished, tmp_path, monkeypatch):
    import flasht5.train.loop as loop

    class Stopping(loop.TrainStep):
        def __call__(self, batch):
            if self.steps == 6:
                raise Stop
            return super().__call__(batch)

    out = tmp_path / "run"
    monkeypatch.setattr(loop, "TrainStep", Stopping)
    with pytest.raises(Stop):
        _run(shared, out, 10)
    monkeypatch.undo()
    resumed = _run(shared, out, 10, "--train.resume=true")
    assert _rows(out) == _rows(finished)
    for name in ("final", "best"):
        a, b = _weights(out / name), _weights(finished / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "best" / "flasht5_best.json").read_text()) == json.loads(
        (finished / "best" / "flasht5_best.json").read_text()
    )
    summary = json.loads((finished / "summary.json").read_text())
    assert resumed["best"] == summary["best"] and resumed["initial_metrics"] == summary["initial_metrics"]
    if HAVE_TENSORBOARD:  # the stopped run's events after the checkpoint (step 4) are purged: each step once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10]
        assert [e.step for e in acc.Scalars("eval/loss")] == [0, 5, 10]
    assert (out / "predictions" / "step-0000010.jsonl").read_text() == (
        finished / "predictions" / "step-0000010.jsonl"
    ).read_text()


def test_classification_task_trains_and_reports_accuracy_and_f1(shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "cls"
    summary = _run(shared, out, 12, "--optim.lr=0.01", task="classification")
    evals = [r for r in _rows(out) if "eval_loss" in r]
    assert all({"eval_loss", "eval_accuracy", "eval_f1"} <= set(r) for r in evals)
    assert all(0 <= r["eval_accuracy"] <= 100 for r in evals)
    preds = [json.loads(x) for x in Path(summary["predictions"]).read_text().splitlines()]
    assert len(preds) == 12 and {p["label"] for p in preds} <= {"lord", "other"}
    assert {p["prediction"] for p in preds} <= {"lord", "other"}
    from flasht5.modeling import FlashT5ForSequenceClassification

    model = FlashT5ForSequenceClassification.from_pretrained(out / "final")
    assert model.config.id2label == {0: "lord", 1: "other"} and model.config.num_labels == 2
    ok = sum(p["label"] == p["prediction"] for p in preds)
    assert evals[-1]["eval_accuracy"] == pytest.approx(100 * ok / len(preds))


def test_finetune_starts_from_a_stock_hugging_face_t5_folder(shared: Path, tmp_path: Path) -> None:
    from hf_utils import save_hf, tiny_hf

    from flasht5.data.tokenizer import load_tokenizer

    hf = save_hf(tiny_hf("t5-v1.1", vocab_size=512), tmp_path / "hf")
    load_tokenizer(shared / "tok").save_pretrained(hf)
    out = tmp_path / "o"
    summary = _run(shared, out, 4, f"--model.init_from={hf}", "--data.tokenizer=null", "--model.overrides={}",
                   "--train.eval_every=4")  # fmt: skip
    assert summary["steps"] == 4 and summary["final_metrics"]["eval_loss"] > 0
    from flasht5.modeling import FlashT5ForConditionalGeneration

    model = FlashT5ForConditionalGeneration.from_pretrained(out / "final")
    assert model.config.d_model == 32 and model.config.vocab_size == 512


def test_pretraining_through_the_task_loop_still_evaluates_and_samples(tmp_path: Path) -> None:
    """flasht5 train drives the same loop with PretrainTask: held-out loss rows and span-filling samples."""
    from flasht5.train.loop import train

    corpus = tmp_path / "c.txt"
    with gzip.open(ROOT / "data" / "corpus" / "kjv_train.txt.gz", "rt", encoding="utf-8") as f:
        corpus.write_text("".join(next(f) for _ in range(30)))
    cfg = load_config(
        ROOT / "configs" / "pretrain" / "demo.yaml",
        [f"--train.out_dir={tmp_path / 'o'}", f"--data.tokenizer={tmp_path / 'tok'}", f"--data.corpus=[{corpus}]",
         f"--data.heldout=[{corpus}]", "--data.vocab_size=300", "--train.steps=3", "--train.eval_every=3",
         "--data.max_tokens=256", "--data.max_input_len=64", "--data.max_target_len=16", "--data.eval_batches=1",
         f"--model.overrides={TINY}", "--train.samples=1", "--train.progress=false", "--train.device=cpu"],
    )  # fmt: skip
    summary = train(cfg)
    assert [r["step"] for r in _rows(tmp_path / "o") if "eval_loss" in r] == [0, 3]
    assert len(summary["samples"]) == 1 and set(summary["samples"][0]) == {"input", "truth", "model"}
    if (tmp_path / "o" / "tensorboard").exists():
        assert any((tmp_path / "o" / "tensorboard").iterdir())
    shutil.rmtree(tmp_path / "o")


def test_long_config_and_its_data_builder(shared: Path) -> None:
    cfg = load_config(ROOT / "configs" / "finetune" / "long.yaml", check_paths_too=False, schema=FinetuneConfig)
    assert cfg.model.preset == "t5-v1_1-base" and cfg.model.overrides["vocab_size"] == 32128
    assert cfg.data.max_input_len == 16384 == cfg.data.max_tokens and cfg.data.mode == "varlen"
    rows = masked_word_examples(shared / "kjv.txt", 3, seed=0, min_words=5000, max_words=11000, join=True)
    for r in rows:  # passages run over several chapters
        assert 5000 <= len(r["input"].split()) <= 11000 + 5 and r["input"].count("<extra_id_0>") == 1


# ---------------------------------------------------------------------------------------------------------------
# GPU (run on the H200 through the device tool): the CUDA-graph step, MFU / peak memory, no host sync
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["seq2seq", "classification"])
def test_finetune_on_cuda_replays_the_step_and_logs_mfu_and_memory(shared: Path, tmp_path: Path, task: str) -> None:
    out = tmp_path / task
    summary = _run(shared, out, 12, "--train.device=cuda", "--train.eval_every=6", task=task)
    rows = _rows(out)
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert train[-1]["graphed"] is True  # static varlen batches: the step is replayed from one CUDA graph
    assert all(r["peak_mem_gb"] > 0 for r in train)
    assert all(0 < r["mfu"] < 1 for r in train if "mfu" in r)
    key = "eval_accuracy" if task == "classification" else "eval_exact_match"
    assert all(key in r for r in rows if "eval_loss" in r) and summary["final_metrics"][key] >= 0
    if HAVE_TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        assert {"train/loss", "train/peak_mem_gb", "eval/loss"} <= set(acc.Tags()["scalars"])


@pytest.mark.gpu
def test_packed_classifier_step_replays_without_host_sync() -> None:
    from flasht5 import FlashT5Config
    from flasht5.modeling import FlashT5ForSequenceClassification
    from flasht5.train.optim import AdamWScale
    from flasht5.train.step import TrainStep

    cfg = FlashT5Config.from_preset("demo", vocab_size=128, d_model=64, d_kv=32, d_ff=128, num_layers=2,
                                    num_heads=2, num_labels=3)  # fmt: skip
    model = FlashT5ForSequenceClassification(cfg).cuda()
    core = PackedClassifier(model)
    step = TrainStep(core, AdamWScale(model.parameters(), lr=1e-3), cuda_graph=True)
    ds = SFTDataset(_examples(400, classification=True), eos_id=1, pad_id=0, max_input_len=48, max_target_len=48,
                    max_tokens=256, max_docs="auto", seed=0)  # fmt: skip
    batches = iter(ds)
    for _ in range(5):  # eager warm-up, then the capture
        step(next(batches)["batch"])
    assert step.graphed
    ready = [next(batches)["batch"].pin_memory() for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(b).loss for b in ready]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(torch.stack(losses)).tolist())


@pytest.mark.parametrize("task", ["seq2seq", "classification"])
def test_padded_mode_trains_both_tasks(shared: Path, tmp_path: Path, task: str) -> None:
    """data.mode=padded: rows packed with segment ids (the classifier's decoder rows mirror the encoder's)."""
    summary = _run(shared, tmp_path / task, 3, "--data.mode=padded", "--data.row_len=96", "--train.eval_every=3",
                   "--train.samples=0", task=task)  # fmt: skip
    rows = _rows(tmp_path / task)
    train = [r for r in rows if "loss" in r]
    assert train and all(r["data_input_padding"] > 0 for r in train)  # rows, not one varlen bin: padding counted
    assert math.isfinite(summary["final_metrics"]["eval_loss"])


# ---------------------------------------------------------------------------------------------------------------
# Data parallel (issue 13's loop): 2 gloo ranks == 1 process with 2 accumulated micro-batches (the same streams)
# ---------------------------------------------------------------------------------------------------------------

NODROP = "--model.overrides={d_model: 32, d_kv: 16, d_ff: 64, num_layers: 1, num_heads: 2, dropout_rate: 0.0}"
# steps.jsonl per step, log rows every 2 steps and a checkpoint between them (step 3): the record's collective path
RECORD = ("--train.record_steps=true", "--train.log_every=2", "--train.save_every=3")


def _ft_rank(rank: int, world_size: int, port: int, shared: str, out: str) -> None:
    import os
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _run(Path(shared), Path(out), 6, "--dist.strategy=ddp", NODROP, "--train.threads=1", *RECORD)
    except BaseException:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_finetune_on_two_ddp_ranks_trains_the_curve_of_one_process_with_accumulation(shared: Path, tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    one, two = tmp_path / "one", tmp_path / "ddp2"
    _run(shared, one, 6, "--train.grad_accum=2", "--dist.strategy=none", NODROP, "--train.threads=1", *RECORD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(_ft_rank, args=(2, port, str(shared), str(two)), nprocs=2, join=True, start_method="fork")
    except Exception as e:
        errors = "\n".join(p.read_text() for p in sorted(two.glob("error-*.txt")))
        raise AssertionError(f"a rank failed:\n{errors or e}") from e
    losses = lambda out: [r["loss"] for r in _rows(out) if "loss" in r]
    evals = lambda out: [r["eval_loss"] for r in _rows(out) if "eval_loss" in r]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    steps = lambda out: [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in steps(two)] == pytest.approx([r["loss"] for r in steps(one)], rel=1e-5, abs=1e-6)
    assert [r["step"] for r in steps(two)] == list(range(1, 7))
    # rank 0's examples are the first micro-batch's of the one-process run (stream 0 of 2 in both)
    assert all(set(map(tuple, a["examples"])) < set(map(tuple, b["examples"])) for a, b in zip(steps(two), steps(one)))
    assert evals(two) == pytest.approx(evals(one), rel=1e-5, abs=1e-6)
    assert len(evals(two)) == 3  # one row per evaluation: rank 0 writes
    assert (two / "best" / "flasht5_best.json").is_file() and (two / "predictions" / "step-0000006.jsonl").is_file()


def test_record_steps_writes_each_steps_examples_loss_and_lr(shared: Path, tmp_path: Path, monkeypatch) -> None:
    """train.record_steps: steps.jsonl has one row per step whose example keys are indices into data.train (their
    tokens are the step's token counts), whose losses average to the metrics rows, and whose record survives a
    checkpoint between log rows (save_every=3, log_every=2) and a resume from it."""
    import flasht5.train.loop as loop
    from flasht5.data.tokenizer import load_tokenizer
    from flasht5.train.finetune import read_examples, tokenize_examples

    out = tmp_path / "rec"
    args = ("--train.record_steps=true", "--data.eval=[]", "--train.samples=0", "--train.save_every=3",
            "--optim.name=adamw", "--optim.lr=1e-3", "--optim.schedule=linear", "--optim.final_lr_ratio=0")  # fmt: skip
    _run(shared, out, 5, *args)
    text = (out / "steps.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    cfg = _cfg(shared, out, 5, *args)
    ex, _ = tokenize_examples(load_tokenizer(shared / "tok"), read_examples(cfg.data.train, "input", "target"), cfg)
    seen = []
    for r in rows:
        assert all(epoch == 0 and chunk == 0 for epoch, _, chunk in r["examples"])
        ids = [doc for _, doc, _ in r["examples"]]
        assert r["input_tokens"] == sum(len(ex.input(i)) for i in ids)
        assert r["target_tokens"] == sum(len(ex.target(i)) for i in ids)
        seen.extend(ids)
    assert len(seen) == len(set(seen))  # one epoch is not over: no example twice
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert metrics[2]["loss"] == pytest.approx((rows[0]["loss"] + rows[1]["loss"]) / 2, rel=1e-9)
    # warm-up over 2 steps, then linear decay to 0 at step 5
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])

    class Stopping(loop.TrainStep):  # dies in step 5: the newest checkpoint is step 3's, between log rows
        def __call__(self, batch):
            if self.steps == 4:
                raise Stop
            return super().__call__(batch)

    again = tmp_path / "again"
    monkeypatch.setattr(loop, "TrainStep", Stopping)
    with pytest.raises(Stop):
        _run(shared, again, 5, *args)
    monkeypatch.undo()
    assert [json.loads(line)["step"] for line in (again / "steps.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    _run(shared, again, 5, *args, "--train.resume=true")
    assert (again / "steps.jsonl").read_text() == text
