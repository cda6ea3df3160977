"""Load a Hugging Face T5 folder with flasht5, check it computes what transformers computes, generate, export back.

    python examples/convert_and_generate.py [HF_T5_FOLDER]

Without a folder it builds a tiny random T5 v1.1 offline, so the example runs anywhere.
"""

from __future__ import annotations

import sys
import tempfile

import torch
import transformers

from flasht5 import FlashT5ForConditionalGeneration
from flasht5.convert import to_hf


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else None
    if folder is None:
        folder = tempfile.mkdtemp()
        cfg = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                    feed_forward_proj="gated-gelu", decoder_start_token_id=0)  # fmt: skip
        transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    model = FlashT5ForConditionalGeneration.from_pretrained(folder).eval()  # converted on the fly

    input_ids = torch.randint(2, hf.config.vocab_size, (2, 12))
    labels = torch.randint(2, hf.config.vocab_size, (2, 6))
    with torch.no_grad():
        ours, theirs = model(input_ids=input_ids, labels=labels), hf(input_ids=input_ids, labels=labels)
    print(f"max |logits - transformers| = {(ours.logits - theirs.logits).abs().max():.2e}, "
          f"loss {ours.loss:.4f} vs {theirs.loss:.4f}")  # fmt: skip
    print("greedy:", model.generate(input_ids, max_new_tokens=8).tolist())

    out = tempfile.mkdtemp()
    to_hf(model, out)  # a stock transformers folder again
    print("exported to", out)


if __name__ == "__main__":
    main()
