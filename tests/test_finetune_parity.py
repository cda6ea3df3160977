"""benchmarks/finetune_parity.py on the CPU: flasht5 finetune and transformers' Seq2SeqTrainer from the same stock
T5 folder on the same recorded batches give the same loss curve in fp32 (to rounding), and the report is written.

This is the parity test proper (fp32, so any difference in the model, the loss, AdamW, clipping, the schedule or the
batches shows); the H200 run of the same script compares the bf16 curves over 300 steps and the speed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("accelerate")  # transformers' Trainer needs it


def _bench():
    spec = importlib.util.spec_from_file_location("finetune_parity", ROOT / "benchmarks" / "finetune_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_parity"] = module
    spec.loader.exec_module(module)
    return module


def test_flasht5_finetune_and_hf_trainer_curves_agree_in_fp32(tmp_path: Path) -> None:
    out = tmp_path / "parity"
    report = _bench().main([
        "--preset", "tiny", "--steps", "10", "--skip", "0", "--train-examples", "400", "--tokenizer-pieces", "500",
        "--max-tokens", "256", "--warmup", "3", "--lr", "2e-3", "--device", "cpu", "--out", str(out),
    ])  # fmt: skip
    res, ft, hf = report["result"], report["flasht5"], report["hf"]
    assert res["steps"] == len(ft["losses"]) == len(hf["losses"]) == 10
    assert res["first_step_diff"] < 1e-5  # the same weights, batch and loss
    assert res["max_abs_diff"] < 1e-4, (ft["losses"], hf["losses"])  # ... and the same updates, step after step
    assert ft["losses"][-1] < ft["losses"][0] - 0.3  # it trains: the agreement is not that of two flat curves
    assert res["lr_max_abs_diff"] < 1e-12 and res["agree"]
    assert hf["optimizer"] == "AdamW"  # the Trainer's own default optimizer ran
    saved = json.loads((out / "parity.json").read_text())
    assert saved["result"]["max_abs_diff"] == res["max_abs_diff"]
    assert "Speed-up" in (out / "parity.md").read_text() and (out / "parity.png").stat().st_size > 10_000
