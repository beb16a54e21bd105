"""Source: a llama.cpp .gguf file (architecture "llama"), read with the `gguf` package.

Tensors are dequantised one at a time to float32 (gguf.quants.dequantize); the config comes from the
file's llama.* metadata and the tokenizer is rebuilt from its tokenizer.* metadata by transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.names import GGUF_LLAMA, NameMap
from polar_jax.config import ModelConfig


def _clean_float(x) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.99999974e-06. Seven significant digits recover the decimal.
    return float(f"{float(x):.7g}")


class GGUFSource:
    """A .gguf file, for convert.writer."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, IndexError, ... on a truncated or foreign file
            raise ValueError(f"corrupt or truncated GGUF file {self.path}: {type(e).__name__}: {e}") from e
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.name_map: NameMap = GGUF_LLAMA
        self.cfg = self._config()

    def _field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch != "llama":
            raise ValueError(f"unsupported GGUF architecture {arch!r} in {self.path} (supported: llama)")
        if "rope_freqs.weight" in self._tensors:
            raise ValueError(f"{self.path} has rope_freqs (LLaMA-3.1 RoPE scaling): not supported from GGUF; "
                             "convert the HF checkpoint instead")
        experts = self._field("llama.expert_count")
        if experts:
            raise ValueError(f"{self.path} is a mixture-of-experts model (llama.expert_count={experts}): "
                             "not supported")
        scaling = self._field("llama.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise ValueError(f"unsupported GGUF RoPE scaling {scaling!r} in {self.path}")

        def need(key):
            v = self._field(key)
            if v is None:
                raise ValueError(f"GGUF file {self.path} lacks the metadata key {key!r}")
            return v

        dim, heads = int(need("llama.embedding_length")), int(need("llama.attention.head_count"))
        vocab = self._field("llama.vocab_size")
        if vocab is None:
            tokens = self.reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else None
        if vocab is None and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])  # GGML order: [D, V]
        head_dim = int(self._field("llama.attention.key_length", dim // heads))
        rot = self._field("llama.rope.dimension_count")
        if rot is not None and int(rot) != head_dim:  # llama.cpp refuses it too ("invalid n_rot")
            raise ValueError(f"{self.path} rotates {int(rot)} of each head's {head_dim} dimensions "
                             "(llama.rope.dimension_count): partial RoPE is not supported")
        eos = [self._field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        bos = self._field("tokenizer.ggml.bos_token_id")
        return ModelConfig(
            name=self.path.stem, family="llama", vocab_size=int(vocab), dim=dim,
            n_layers=int(need("llama.block_count")), n_heads=heads,
            n_kv_heads=int(self._field("llama.attention.head_count_kv", heads)),
            mlp_dim=int(need("llama.feed_forward_length")),
            max_positions=int(self._field("llama.context_length", 4096)),
            head_dim=head_dim, norm="rms",
            norm_eps=_clean_float(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)), positions="rope",
            rope_theta=_clean_float(self._field("llama.rope.freq_base", 10000.0)), activation="silu",
            gated_mlp=True, tie_embeddings="output.weight" not in self._tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            pad_token_id=int(self._field("tokenizer.ggml.padding_token_id", 0)),
        )

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            x = dequantize(t.data, t.tensor_type)  # float32, [out, in] (GGML lists dims innermost first)
        except NotImplementedError as e:
            raise ValueError(f"tensor {name!r} in {self.path}: {e}") from e
        return x.reshape([int(d) for d in reversed(t.shape)])  # 1-D and F32 tensors: same row-major order

    def write_tokenizer(self, dest: Path) -> None:
        """Rebuild the tokenizer from the file's tokenizer.* metadata and save it, chat template included."""
        import tempfile

        import transformers

        # transformers prefers tokenizer files in the GGUF's folder (tokenizer.json, tokenizer_config.json) to
        # the file's own metadata: read the file from a folder that holds nothing else (a link to it).
        try:
            with tempfile.TemporaryDirectory() as alone:
                link = Path(alone) / self.path.name
                link.symlink_to(self.path.resolve())
                tok = transformers.AutoTokenizer.from_pretrained(alone, gguf_file=link.name)
        except Exception as e:
            raise ValueError(f"cannot build a tokenizer from {self.path}: {type(e).__name__}: {e}") from e
        template = self._field("tokenizer.chat_template")
        if template and not getattr(tok, "chat_template", None):
            tok.chat_template = template  # older transformers drop it on the GGUF path
        tok.save_pretrained(str(dest))
