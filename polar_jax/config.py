"""Model configuration: one frozen dataclass, named presets, and a constructor from HF config.json.

OPT and LLaMA differ only through the fields below; nothing is inferred from file names.

Letter vocabulary used in shape comments across the project:
  B batch, T query length, S cache length, N query heads, K kv heads, G heads per group (N // K),
  H head dim, D model dim, E word-embedding dim (OPT project_in/out), F MLP width, L layers, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pallas_kernels.common import HEAD_DIMS


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 style frequency-dependent RoPE scaling (HF rope_type 'llama3')."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # "opt" | "llama": informational; behaviour follows the fields below
    vocab_size: int  # V
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    mlp_dim: int  # F
    max_positions: int
    head_dim: int = 0  # H; 0 means dim // n_heads
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    post_norm: bool = False  # OPT-350m: norms after the residual add, no final norm
    positions: str = "rope"  # "rope" | "learned" (OPT: table with offset 2)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    activation: str = "silu"  # "relu" | "gelu" | "silu"
    gated_mlp: bool = True  # SwiGLU: act(x @ gate) * (x @ up)
    qkv_bias: bool = False
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    tie_embeddings: bool = False
    embed_dim: int = 0  # E; 0 means dim. OPT-350m: 512 with project_in/out
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.embed_dim == 0:
            object.__setattr__(self, "embed_dim", self.dim)
        checks = [
            (self.n_heads % self.n_kv_heads == 0, f"{self.n_heads=} must be a multiple of {self.n_kv_heads=}"),
            (self.norm in ("rms", "layer"), f"{self.norm=} must be 'rms' or 'layer'"),
            (self.positions in ("rope", "learned"), f"{self.positions=} must be 'rope' or 'learned'"),
            (self.activation in ("relu", "gelu", "silu"), f"{self.activation=} must be relu, gelu or silu"),
            # Decode runs the MLP through pallas_kernels.selective_gemm: a silu gate, else relu or gelu.
            (self.activation == "silu" if self.gated_mlp else self.activation != "silu",
             f"a {'gated' if self.gated_mlp else 'ungated'} MLP with {self.activation=} is not supported (gated "
             "MLPs take silu, ungated ones relu or gelu: what the decode kernels compute)"),
            (not (self.post_norm and self.norm != "layer"), "post_norm is only defined for LayerNorm models"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid model config {self.name!r}: {msg}")

    @property
    def has_project(self) -> bool:
        return self.embed_dim != self.dim

    @property
    def has_final_norm(self) -> bool:
        return not self.post_norm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _opt(name, dim, layers, heads, vocab=50272, embed_dim=0, post_norm=False, max_positions=2048):
    return ModelConfig(
        name=name, family="opt", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
        n_kv_heads=heads, mlp_dim=4 * dim, max_positions=max_positions, norm="layer", post_norm=post_norm,
        positions="learned", activation="relu", gated_mlp=False, qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=True, embed_dim=embed_dim, bos_token_id=2, eos_token_ids=(2,),
        pad_token_id=1,
    )


def _llama(name, dim, layers, heads, kv_heads, mlp_dim, vocab=32000, theta=10000.0, max_positions=4096,
           scaling=None, tie=False, bos=1, eos=(2,), eps=1e-5, head_dim=0):
    return ModelConfig(
        name=name, family="llama", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
        n_kv_heads=kv_heads, mlp_dim=mlp_dim, max_positions=max_positions, head_dim=head_dim, norm="rms", norm_eps=eps,
        positions="rope", rope_theta=theta, rope_scaling=scaling, activation="silu", gated_mlp=True,
        tie_embeddings=tie, bos_token_id=bos, eos_token_ids=eos, pad_token_id=0,
    )


_LLAMA31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)

PRESETS: dict[str, ModelConfig] = {c.name: c for c in [
    _opt("opt-125m", 768, 12, 12),
    _opt("opt-350m", 1024, 24, 16, embed_dim=512, post_norm=True),
    _opt("opt-1.3b", 2048, 24, 32),
    _opt("opt-2.7b", 2560, 32, 32),
    _opt("opt-6.7b", 4096, 32, 32),
    _opt("opt-13b", 5120, 40, 40),
    _opt("opt-30b", 7168, 48, 56),
    _opt("opt-66b", 9216, 64, 72),
    _llama("llama-2-7b", 4096, 32, 32, 32, 11008),
    _llama("llama-2-13b", 5120, 40, 40, 40, 13824),
    _llama("llama-2-70b", 8192, 80, 64, 8, 28672),
    _llama("llama-3-8b", 4096, 32, 32, 8, 14336, vocab=128256, theta=500000.0, max_positions=8192,
           bos=128000, eos=(128001, 128009)),
    _llama("llama-3-70b", 8192, 80, 64, 8, 28672, vocab=128256, theta=500000.0, max_positions=8192,
           bos=128000, eos=(128001, 128009)),
    _llama("llama-3.1-8b", 4096, 32, 32, 8, 14336, vocab=128256, theta=500000.0, max_positions=131072,
           scaling=_LLAMA31, bos=128000, eos=(128001, 128008, 128009)),
    _llama("llama-3.1-70b", 8192, 80, 64, 8, 28672, vocab=128256, theta=500000.0, max_positions=131072,
           scaling=_LLAMA31, bos=128000, eos=(128001, 128008, 128009)),
    _llama("smollm2-135m", 576, 30, 9, 3, 1536, vocab=49152, theta=100000.0, max_positions=8192, tie=True,
           bos=1, eos=(2,)),
    # Tiny configs for tests: odd sizes on purpose; head dims the decode kernel supports (64).
    _opt("tiny-opt", 128, 3, 2, vocab=101, max_positions=64),
    _opt("tiny-opt-350m", 128, 3, 2, vocab=101, embed_dim=96, post_norm=True, max_positions=64),
    _llama("tiny-llama", 128, 3, 2, 2, 192, vocab=103, max_positions=64),
    _llama("tiny-llama-gqa", 96, 3, 6, 2, 160, vocab=103, max_positions=64, tie=True, head_dim=64),
    _llama("tiny-llama3", 128, 2, 2, 1, 192, vocab=103, theta=500000.0, max_positions=64,
           scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
]}


def check_head_dim(cfg: ModelConfig) -> None:
    """A one-line ValueError unless the model's head size is one polar's attention kernels (and their XLA
    references) take: every forward pass, decoding, prefill and perplexity alike, runs them."""
    if cfg.head_dim not in HEAD_DIMS:
        raise ValueError(f"model {cfg.name!r} has head_dim={cfg.head_dim}; polar's attention kernels support "
                         f"head_dim {', '.join(map(str, HEAD_DIMS))}")


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _rope_scaling_from_hf(rs) -> RopeScaling | None:
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling must be an object or null, not {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
    try:
        return RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
                           int(rs["original_max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"llama3 rope_scaling lacks {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"llama3 rope_scaling has a non-numeric value: {rs}") from e


def eos_ids(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of them, not {eos!r}")
    return tuple(ids)


def token_ids(seq) -> list[int]:
    """seq's token ids (a list, or a numpy / jax array) as Python ints. ValueError naming the first that is
    not an integer (a float, a bool, a string): int() would run [1.7, "8"] as [1, 8], a prompt nobody wrote."""
    if hasattr(seq, "tolist"):  # one transfer for an array, not one per element
        seq = seq.tolist()
    if isinstance(seq, (bytes, bytearray, Mapping)):  # iterating them gives byte values or keys, not a prompt
        raise ValueError(f"a prompt is text (str) or token ids (a list of ints), not a {type(seq).__name__}")
    out = []
    for t in seq:
        try:
            if isinstance(t, bool):
                raise TypeError
            out.append(operator.index(t))  # int, numpy and jax integer scalars; not floats or strings
        except TypeError:
            raise ValueError(f"token id {t!r} ({type(t).__name__}) is not an integer") from None
    return out


# transformers' defaults for fields a config.json may leave out (LlamaConfig, MistralConfig, Qwen2Config)
_HF_DEFAULTS = {"llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6),
                "mistral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, sliding_window=4096),
                "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=4096)}


def _checked(name: str, v, kind, minimum=None):
    """v, checked to be of `kind` (int: not a bool; float: any number) and >= minimum, as `kind`."""
    ok = isinstance(v, (int, float)) if kind is float else isinstance(v, int)
    if not ok or isinstance(v, bool) or (minimum is not None and v < minimum):
        what = "a number" if kind is float else "an integer"
        raise ValueError(f"{name} must be {what}{'' if minimum is None else f' >= {minimum}'}, not {v!r}")
    return kind(v)


def _field(hf: dict, name: str, kind, default=None, minimum=None):
    """hf[name] (or `default` when absent or null; KeyError without one), checked by _checked."""
    v = hf.get(name)
    if v is None:
        if default is None:
            raise KeyError(name)
        return default
    return _checked(name, v, kind, minimum)


def _context_of(hf: dict, arch: str, max_positions: int) -> int:
    """max_positions, capped at the sliding window of a Mistral / Qwen2 model that uses one: polar attends to
    the whole context, which equals sliding-window attention only for sequences within the window."""
    if arch != "mistral" and not (arch == "qwen2" and hf.get("use_sliding_window")):
        return max_positions
    window = hf.get("sliding_window", _HF_DEFAULTS[arch]["sliding_window"])
    if window is None:
        return max_positions
    window = _checked("sliding_window", window, int, minimum=1)
    if window >= max_positions:
        return max_positions
    warnings.warn(f"{arch} sliding-window attention (window {window}) is not implemented: the converted model's "
                  f"context is capped at {window} tokens (from {max_positions}), within which full attention "
                  "is the same", stacklevel=3)
    return window


def from_hf_config(hf: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Build a ModelConfig from a transformers config.json dict (OPT, LLaMA, Mistral, Qwen2).

    Raises KeyError naming a required field that is missing, ValueError for a field of the wrong type or
    an option polar does not implement."""
    if not isinstance(hf, dict):
        raise ValueError(f"a model config must be a JSON object, not {type(hf).__name__}")
    arch = hf.get("model_type")
    if arch == "opt":
        if hf.get("activation_function", "relu") != "relu":
            raise ValueError(f"unsupported OPT activation {hf['activation_function']!r} (supported: relu)")
        for option, supported in (("layer_norm_elementwise_affine", True), ("_remove_final_layer_norm", False)):
            if hf.get(option, supported) != supported:
                raise ValueError(f"unsupported OPT option {option}={hf[option]!r}")
        dim = _field(hf, "hidden_size", int, minimum=1)
        heads = _field(hf, "num_attention_heads", int, minimum=1)
        return ModelConfig(
            name=name, family="opt", vocab_size=_field(hf, "vocab_size", int, minimum=1), dim=dim,
            n_layers=_field(hf, "num_hidden_layers", int, minimum=1), n_heads=heads, n_kv_heads=heads,
            mlp_dim=_field(hf, "ffn_dim", int, minimum=1),
            max_positions=_field(hf, "max_position_embeddings", int, 2048, minimum=1), norm="layer",
            norm_eps=1e-5, post_norm=not hf.get("do_layer_norm_before", True), positions="learned",
            activation="relu", gated_mlp=False, qkv_bias=hf.get("enable_bias", True),
            out_bias=hf.get("enable_bias", True), mlp_bias=hf.get("enable_bias", True),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            embed_dim=_field(hf, "word_embed_proj_dim", int, dim, minimum=1), bos_token_id=hf.get("bos_token_id", 2),
            eos_token_ids=eos_ids(hf.get("eos_token_id", 2)), pad_token_id=hf.get("pad_token_id", 1) or 0,
        )
    if arch in ("llama", "mistral", "qwen2"):
        # transformers computes SiLU for "swish" too
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported {arch} activation {hf['hidden_act']!r} (supported: silu)")
        if hf.get("mlp_bias"):
            raise ValueError(f"unsupported {arch} option mlp_bias=true (biases on the MLP projections)")
        defaults = _HF_DEFAULTS[arch]
        dim = _field(hf, "hidden_size", int, minimum=1)
        heads = _field(hf, "num_attention_heads", int, minimum=1)
        rope = hf.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object or null, not {rope!r}")
        theta = hf.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
        qkv_bias = arch == "qwen2" or bool(hf.get("attention_bias", False))
        max_positions = _field(hf, "max_position_embeddings", int, defaults["max_position_embeddings"], minimum=1)
        return ModelConfig(
            name=name, family="llama", vocab_size=_field(hf, "vocab_size", int, minimum=1), dim=dim,
            n_layers=_field(hf, "num_hidden_layers", int, minimum=1), n_heads=heads,
            n_kv_heads=_field(hf, "num_key_value_heads", int, heads, minimum=1),
            mlp_dim=_field(hf, "intermediate_size", int, minimum=1),
            max_positions=_context_of(hf, arch, max_positions),
            head_dim=_field(hf, "head_dim", int, dim // heads, minimum=1), norm="rms",
            norm_eps=_field(hf, "rms_norm_eps", float, defaults["rms_norm_eps"]), positions="rope",
            rope_theta=_checked("rope_theta", theta, float, minimum=0),
            rope_scaling=_rope_scaling_from_hf(hf.get("rope_scaling") or rope),
            activation="silu", gated_mlp=True, qkv_bias=qkv_bias, out_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id") or 0,
        )
    raise ValueError(f"unsupported architecture model_type={arch!r} (supported: opt, llama, mistral, qwen2)")


def load_config(path: str | Path) -> ModelConfig:
    """Read our own config.json (written by `polar convert`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"corrupt model config {path}: {e}") from e
