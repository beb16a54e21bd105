"""Batched generation: dense prefill of ragged prompts, then a jitted `lax.while_loop` of decode steps.

Prompts are right-padded to a power-of-two length bucket and the cache to a power-of-two length, so a new
prompt length only recompiles when it crosses a bucket. The whole loop runs inside one jit; the cache is
created there and updated in place.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.cache import KVCache, init_cache
from polar_jax.config import ModelConfig
from polar_jax.model import forward
from polar_jax.sparsity import SparsityConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: jax.Array, key: jax.Array, sc: SamplingConfig) -> jax.Array:
    """logits [B, V] fp32 -> tokens [B] int32."""
    if sc.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sc.temperature
    if sc.top_k > 0:
        kth = jax.lax.top_k(logits, sc.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sc.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        cutoff_idx = jnp.sum(cum < sc.top_p, axis=-1, keepdims=True)  # [B, 1]
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class GenerateOutput(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32, padded with pad_token_id after each sequence ends
    lengths: np.ndarray  # [B] generated tokens per sequence, a stop token included
    steps: int  # decode steps run (the loop stops when every sequence is done)
    compile_s: float  # seconds spent compiling (0 when this shape bucket was compiled before)
    run_s: float  # seconds spent running prefill and the decode loop

    @property
    def tokens_per_s(self) -> float:
        return float(self.lengths.sum()) / max(self.run_s, 1e-9)


def bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class _State(NamedTuple):
    step: jax.Array
    out: jax.Array  # [B, M]
    n_gen: jax.Array  # [B]
    done: jax.Array  # [B] bool
    last: jax.Array  # [B]
    cache: KVCache
    key: jax.Array


def _generate(params, tokens, prompt_lens, max_new_each, key, *, cfg: ModelConfig, max_new: int, max_len: int,
              sampling: SamplingConfig, sparsity: SparsityConfig | None, stop: tuple[int, ...]):
    B = tokens.shape[0]
    stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)
    cache = init_cache(cfg, B, max_len, params["embed"].dtype)
    logits, cache, _ = forward(cfg, params, tokens, cache, n_new=prompt_lens, last_only=True)  # dense prefill
    key, sub = jax.random.split(key)
    first = sample(logits, sub, sampling)
    out = jnp.full((B, max_new), cfg.pad_token_id, jnp.int32).at[:, 0].set(first)
    n_gen = jnp.ones((B,), jnp.int32)
    done = jnp.isin(first, stop_arr) | (n_gen >= max_new_each)

    def cond(s: _State):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: _State):
        key, k_sparse, k_sample = jax.random.split(s.key, 3)
        logits, cache, _ = forward(cfg, params, s.last[:, None], s.cache, sparsity=sparsity, key=k_sparse)
        tok = jnp.where(s.done, cfg.pad_token_id, sample(logits[:, 0], k_sample, sampling))
        n_gen = s.n_gen + (~s.done)
        done = s.done | jnp.isin(tok, stop_arr) | (n_gen >= max_new_each)
        return _State(s.step + 1, s.out.at[:, s.step].set(tok), n_gen, done, tok, cache, key)

    s = jax.lax.while_loop(cond, body, _State(jnp.int32(1), out, n_gen, done, first, cache, key))
    return s.out, s.n_gen, s.step


_generate_jit = jax.jit(_generate, static_argnames=("cfg", "max_new", "max_len", "sampling", "sparsity", "stop"))
_compiled: dict = {}  # (static args, argument shapes) -> compiled executable


def _compile(args: tuple, static: dict):
    """Compile once per (static arguments, shapes and dtypes), so compile and run time can be told apart."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (treedef, tuple((x.shape, str(x.dtype)) for x in leaves), tuple(sorted(static.items(), key=str)))
    if key not in _compiled:
        _compiled[key] = _generate_jit.lower(*args, **static).compile()
    return _compiled[key]


def prepare(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
            max_len: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Validate and pad: (tokens [B, Tb], prompt_lens [B], max_new_each [B], max_new, max_len)."""
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt")
    lens = np.array([len(p) for p in prompts], np.int32)
    if np.any(lens == 0):
        raise ValueError(f"prompt {int(np.argmin(lens))} is empty: every prompt needs at least one token")
    max_new_each = np.broadcast_to(np.asarray(max_new_tokens, np.int32), lens.shape).copy()
    if np.any(max_new_each < 1):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_new = int(max_new_each.max())
    need = int((lens + max_new_each).max())
    if max_len is None:
        max_len = bucket(need, minimum=128)
        if cfg.positions == "learned":
            max_len = min(max_len, cfg.max_positions)
    if need > max_len:
        worst = int(np.argmax(lens + max_new_each))
        raise ValueError(f"prompt {worst} has {lens[worst]} tokens; with max_new_tokens={max_new_each[worst]} it "
                         f"needs {need} cache positions but the cache holds {max_len}")
    if cfg.positions == "learned" and need > cfg.max_positions:
        raise ValueError(f"{need} positions exceed the model's {cfg.max_positions} learned positions")
    vocab_hits = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if vocab_hits:
        raise ValueError(f"token id {vocab_hits[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    tokens = np.full((len(prompts), bucket(int(lens.max()))), cfg.pad_token_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lens, max_new_each, max_new, max_len


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int] = 64, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_tokens: Sequence[int] | None = None, max_len: int | None = None,
             sparsity: SparsityConfig | None = None) -> GenerateOutput:
    """Generate for a batch of token-id prompts of different lengths.

    Each sequence stops at its own stop token (default: the model's EOS ids) or its max_new_tokens
    (an int, or one per prompt). sparsity: how decode steps select heads and neurons (None: dense).
    """
    tokens, lens, max_new_each, max_new, max_len = prepare(cfg, prompts, max_new_tokens, max_len)
    stop = tuple(cfg.eos_token_ids if stop_tokens is None else stop_tokens)
    args = (params, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(max_new_each), jax.random.key(seed))
    static = dict(cfg=cfg, max_new=max_new, max_len=max_len, sampling=sampling, sparsity=sparsity, stop=stop)
    t0 = time.perf_counter()
    compiled = _compile(args, static)
    t1 = time.perf_counter()
    out, n_gen, steps = jax.block_until_ready(compiled(*args))
    t2 = time.perf_counter()
    return GenerateOutput(np.asarray(out), np.asarray(n_gen), int(steps), t1 - t0, t2 - t1)
