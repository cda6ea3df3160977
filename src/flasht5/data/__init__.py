"""Data pipeline: tokenizers, pretokenized stores, UL2 denoisers and padding-free packing."""
