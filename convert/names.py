"""Conversion as data: one name map per source format, plus the few transforms between orientations.

A name map goes from a source tensor name (a template; `{l}` is the layer index) to our pytree path
(dots between levels, see polar_jax/params.py) and an optional transform. Paths under "layers." are
stacked [L, ...]: source tensor l fills row l.

Orientation (why the transposes): torch nn.Linear and GGUF both store weights [out, in]. Ours are
[rows, D] with rows the dimension sparsity selects, so the "up" projections (q, k, v, up, gate) are
already ours, while the "down" projections (o_proj, down_proj) and OPT-350m's project_in/out are transposed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from polar_jax.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def transpose(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return x.T  # [out, in] -> [in, out]; a view, copied into the stacked array by the writer


def _unpermute_rope(x: np.ndarray, n: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    GGML's RoPE rotates interleaved pairs (rows 2i, 2i+1 of a head); HF's rotates halves (rows i, i + H/2).
    llama.cpp reorders each head's rows from [2, H/2] to [H/2, 2]; we reorder them back so heads are in
    HF rotate-half order, the order our RoPE (and transformers' GGUF loader, `_reverse_permute_weights`) uses.
    """
    rows = x.shape[0]
    h2 = rows // n // 2  # H / 2
    return x.reshape(n, h2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)  # [n, H/2, 2, ...] -> [n, 2, H/2, ...]


def unpermute_q(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _unpermute_rope(x, cfg.n_heads)  # [N*H, D]


def unpermute_k(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return _unpermute_rope(x, cfg.n_kv_heads)  # [K*H, D]


@dataclasses.dataclass(frozen=True)
class NameMap:
    """Source tensor names -> (our path, transform or None, part or None) for one source format.

    part: "q", "k" or "v" for tensors that fill their rows of the fused wqkv / bqkv (params.qkv_rows).
    """

    format: str
    names: dict[str, tuple[str, Transform | None, str | None]]
    strip_prefix: str = ""  # dropped from source names before lookup (OPTForCausalLM's "model.")
    ignore: tuple[str, ...] = ()  # regexes of source tensors that carry nothing we need

    def __post_init__(self):
        compiled = [(re.compile(re.escape(tpl).replace(re.escape("{l}"), r"(\d+)") + "$"), tpl, entry)
                    for tpl, entry in self.names.items()]
        object.__setattr__(self, "_compiled", compiled)

    def lookup(self, name: str) -> tuple[str, int | None, Transform | None, str | None] | None:
        """(path, layer or None, transform, part) for a source tensor; None when the tensor is ignored.

        Raises ValueError naming the tensor when the format has no entry for it.
        """
        key = name[len(self.strip_prefix):] if self.strip_prefix and name.startswith(self.strip_prefix) else name
        for rx, tpl, (path, fn, part) in self._compiled:
            m = rx.match(key)
            if m:
                return path, (int(m.group(1)) if "{l}" in tpl else None), fn, part
        if any(re.search(p, name) for p in self.ignore):
            return None
        raise ValueError(f"unexpected tensor {name!r}: the {self.format} name map has no entry for it "
                         f"({self._why(name)})")

    def _why(self, name: str) -> str:
        """The likely reason a tensor has no entry, for the error message."""
        if re.search(r"\.(qweight|qzeros|scales|g_idx|weight_scale\w*)$", name):
            return "a quantized checkpoint (GPTQ / AWQ / FP8 tensors); polar converts unquantized weights only"
        if any(rx.match(key) for key in ("model." + name, "model.decoder." + name) for rx, _, _ in self._compiled):
            return ("the names lack the 'model.' prefix: a base model saved without its LM head? polar converts "
                    "the ...ForCausalLM checkpoint")
        return "unsupported model variant?"

    def source_name(self, path: str, layer: int | None, part: str | None = None) -> str:
        """The source tensor name that fills `path` (row `layer`, fused part `part`), for error messages."""
        for tpl, (p, _, pt) in self.names.items():
            if p == path and pt == part:
                return tpl.replace("{l}", str(layer))
        return path


def _m(path: str, fn: Transform | None = None, part: str | None = None) -> tuple[str, Transform | None, str | None]:
    return path, fn, part


# HF OPTForCausalLM (and old hub checkpoints saved without the "model." prefix).
# embed_positions is [P + 2, D]: HF's table already holds the 2 offset rows, like our pos_embed.
HF_OPT = NameMap("HF OPT", strip_prefix="model.", names={
    "decoder.embed_tokens.weight": _m("embed"),  # [V, E]
    "decoder.embed_positions.weight": _m("pos_embed"),  # [P + 2, D]
    "decoder.project_in.weight": _m("project_in", transpose),  # [D, E] -> [E, D]
    "decoder.project_out.weight": _m("project_out", transpose),  # [E, D] -> [D, E]
    "decoder.final_layer_norm.weight": _m("final_norm.scale"),
    "decoder.final_layer_norm.bias": _m("final_norm.bias"),
    "lm_head.weight": _m("lm_head"),  # [V, E]; absent or ignored when tied
    "decoder.layers.{l}.self_attn_layer_norm.weight": _m("layers.attn_norm.scale"),
    "decoder.layers.{l}.self_attn_layer_norm.bias": _m("layers.attn_norm.bias"),
    "decoder.layers.{l}.self_attn.q_proj.weight": _m("layers.wqkv", part="q"),  # [N*H, D]
    "decoder.layers.{l}.self_attn.k_proj.weight": _m("layers.wqkv", part="k"),
    "decoder.layers.{l}.self_attn.v_proj.weight": _m("layers.wqkv", part="v"),
    "decoder.layers.{l}.self_attn.q_proj.bias": _m("layers.bqkv", part="q"),
    "decoder.layers.{l}.self_attn.k_proj.bias": _m("layers.bqkv", part="k"),
    "decoder.layers.{l}.self_attn.v_proj.bias": _m("layers.bqkv", part="v"),
    "decoder.layers.{l}.self_attn.out_proj.weight": _m("layers.wo", transpose),  # [D, N*H] -> [N*H, D]
    "decoder.layers.{l}.self_attn.out_proj.bias": _m("layers.bo"),
    "decoder.layers.{l}.final_layer_norm.weight": _m("layers.mlp_norm.scale"),
    "decoder.layers.{l}.final_layer_norm.bias": _m("layers.mlp_norm.bias"),
    "decoder.layers.{l}.fc1.weight": _m("layers.w_up"),  # [F, D]
    "decoder.layers.{l}.fc1.bias": _m("layers.b_up"),
    "decoder.layers.{l}.fc2.weight": _m("layers.w_down", transpose),  # [D, F] -> [F, D]
    "decoder.layers.{l}.fc2.bias": _m("layers.b_down"),
})

# HF LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (Qwen2: q/k/v biases).
HF_LLAMA = NameMap("HF LLaMA", ignore=(r"rotary_emb\.inv_freq$",), names={
    "model.embed_tokens.weight": _m("embed"),  # [V, D]
    "model.norm.weight": _m("final_norm.scale"),
    "lm_head.weight": _m("lm_head"),  # [V, D]; absent or ignored when tied
    "model.layers.{l}.input_layernorm.weight": _m("layers.attn_norm.scale"),
    "model.layers.{l}.self_attn.q_proj.weight": _m("layers.wqkv", part="q"),  # [N*H, D]
    "model.layers.{l}.self_attn.k_proj.weight": _m("layers.wqkv", part="k"),  # [K*H, D]
    "model.layers.{l}.self_attn.v_proj.weight": _m("layers.wqkv", part="v"),
    "model.layers.{l}.self_attn.q_proj.bias": _m("layers.bqkv", part="q"),
    "model.layers.{l}.self_attn.k_proj.bias": _m("layers.bqkv", part="k"),
    "model.layers.{l}.self_attn.v_proj.bias": _m("layers.bqkv", part="v"),
    "model.layers.{l}.self_attn.o_proj.weight": _m("layers.wo", transpose),  # [D, N*H] -> [N*H, D]
    "model.layers.{l}.self_attn.o_proj.bias": _m("layers.bo"),
    "model.layers.{l}.post_attention_layernorm.weight": _m("layers.mlp_norm.scale"),
    "model.layers.{l}.mlp.gate_proj.weight": _m("layers.w_gate"),  # [F, D]
    "model.layers.{l}.mlp.up_proj.weight": _m("layers.w_up"),  # [F, D]
    "model.layers.{l}.mlp.down_proj.weight": _m("layers.w_down", transpose),  # [D, F] -> [F, D]
})

# llama.cpp GGUF, architecture "llama" (LLaMA, Mistral, SmolLM2, ...). Dequantised GGUF tensors come out
# [out, in] like torch (GGML lists dims innermost first); Q and K rows carry llama.cpp's RoPE permutation.
GGUF_LLAMA = NameMap("GGUF llama", names={
    "token_embd.weight": _m("embed"),  # [V, D]
    "output_norm.weight": _m("final_norm.scale"),
    "output.weight": _m("lm_head"),  # [V, D]; absent when tied
    "blk.{l}.attn_norm.weight": _m("layers.attn_norm.scale"),
    "blk.{l}.attn_q.weight": _m("layers.wqkv", unpermute_q, "q"),  # [N*H, D]
    "blk.{l}.attn_k.weight": _m("layers.wqkv", unpermute_k, "k"),  # [K*H, D]
    "blk.{l}.attn_v.weight": _m("layers.wqkv", part="v"),
    "blk.{l}.attn_output.weight": _m("layers.wo", transpose),  # [D, N*H] -> [N*H, D]
    "blk.{l}.ffn_norm.weight": _m("layers.mlp_norm.scale"),
    "blk.{l}.ffn_gate.weight": _m("layers.w_gate"),  # [F, D]
    "blk.{l}.ffn_up.weight": _m("layers.w_up"),
    "blk.{l}.ffn_down.weight": _m("layers.w_down", transpose),  # [D, F] -> [F, D]
})

HF_MAPS = {"opt": HF_OPT, "llama": HF_LLAMA}  # by ModelConfig.family
