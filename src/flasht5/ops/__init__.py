"""Triton kernels, one file per family. Each exposes one public function and its ``*_ref`` reference."""
