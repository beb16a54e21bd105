"""Weight conversion: a transformers model directory or a llama.cpp .gguf file -> a polar model directory.

    convert_checkpoint("path/to/hf_model", "models/opt-125m", dtype="bf16")
    convert_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2", dtype="fp32")

Load the result with polar_jax.checkpoint.load (or polar_jax.load).
"""

from __future__ import annotations

from pathlib import Path

from convert.writer import target_dtype, write_model
from polar_jax import checkpoint


def open_source(src: str | Path):
    """The source reader for `src`: HFSource for a directory, GGUFSource for a .gguf file."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"conversion source not found: {src}")
    if src.is_dir():
        from convert.hf import HFSource

        return HFSource(src)
    if src.suffix.lower() == ".gguf":
        from convert.gguf_source import GGUFSource

        return GGUFSource(src)
    raise ValueError(f"unsupported conversion source {src}: expected a transformers model directory "
                     "(config.json + *.safetensors) or a .gguf file")


def convert_checkpoint(src: str | Path, out: str | Path, dtype: str = "bf16", progress: bool = True,
                       overwrite: bool = False) -> Path:
    """Convert `src` into the model directory `out` (params in `dtype`: "bf16" | "fp16" | "fp32"); returns `out`.

    User errors are FileNotFoundError / FileExistsError / ValueError with a message naming the file or tensor.
    A failed or interrupted conversion leaves neither `out` nor a temporary directory behind.
    """
    target_dtype(dtype)  # cheap checks first, before reading anything
    out = Path(out)
    checkpoint.refuse_existing(out, overwrite)
    source = open_source(src)
    return write_model(source, out, dtype, overwrite=overwrite, progress=progress)


__all__ = ["convert_checkpoint", "open_source"]
