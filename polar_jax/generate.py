"""Batched generation: dense prefill of ragged prompts, then a jitted `lax.while_loop` of decode steps.

Prompts are right-padded to a power-of-two length bucket and the cache to a power-of-two length, so a new
prompt length only recompiles when it crosses a bucket. Two jitted programs: prefill (creates the cache) and
a decode loop that runs up to a step given at run time, so one compiled loop serves chunks of any size; its
state (cache included) is donated and updated in place. `stream` runs the loop in chunks and yields the
tokens of each as events; `generate` runs it in one chunk and returns the whole output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.cache import KVCache, cache_bytes, init_cache
from polar_jax.config import ModelConfig, check_head_dim, token_ids
from polar_jax.model import PREFILL_COMPILER_OPTIONS, forward
from polar_jax.sparsity import SparsityConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
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
    prompt_tokens: int = 0  # real (unpadded) prompt tokens prefilled
    prefill_s: float = 0.0  # seconds of prefill (it also samples each sequence's first token)
    decode_s: float = 0.0  # seconds of the decode steps

    @property
    def tokens_per_s(self) -> float:
        return float(self.lengths.sum()) / max(self.run_s, 1e-9)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens made by decode steps (each sequence's first token comes from prefill) per second."""
        return float(self.lengths.sum() - len(self.lengths)) / max(self.decode_s, 1e-9)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / max(self.steps, 1)


# Events of a generation run (see `stream`), in this order: Compiled, Tokens (prefill), Tokens (decode) ...,
# Finished. A front end prints them as they come; a serving engine can yield the same Tokens.
class Compiled(NamedTuple):
    seconds: float  # 0 when every program was compiled before


class Tokens(NamedTuple):
    new: list[list[int]]  # [B] the tokens each sequence made since the last event (stop token included)
    finished: list[bool]  # [B] whether each sequence is done
    phase: str  # "prefill" (each sequence's first token) or "decode"
    steps: int  # decode steps run so far
    seconds: float  # run time of this part


class Finished(NamedTuple):
    output: GenerateOutput


def bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class _State(NamedTuple):
    step: jax.Array  # tokens made so far by the longest-running sequence: the next column of `out`
    out: jax.Array  # [B, max_new]
    n_gen: jax.Array  # [B]
    done: jax.Array  # [B] bool
    last: jax.Array  # [B]
    cache: KVCache
    key: jax.Array


def _prefill(params, tokens, prompt_lens, max_new_each, key, *, cfg: ModelConfig, max_new: int, max_len: int,
             sampling: SamplingConfig, stop: tuple[int, ...]) -> _State:
    """Dense prefill of the padded prompts into a fresh cache; samples each sequence's first token."""
    B = tokens.shape[0]
    cache = init_cache(cfg, B, max_len, params["embed"].dtype)
    logits, cache, _ = forward(cfg, params, tokens, cache, n_new=prompt_lens, last_only=True)
    key, sub = jax.random.split(key)
    first = sample(logits, sub, sampling)
    out = jnp.full((B, max_new), cfg.pad_token_id, jnp.int32).at[:, 0].set(first)
    n_gen = jnp.ones((B,), jnp.int32)
    done = _stops(first, stop) | (n_gen >= max_new_each)
    return _State(jnp.int32(1), out, n_gen, done, first, cache, key)


def _stops(tok: jax.Array, stop: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tok, jnp.asarray(stop if stop else (-1,), jnp.int32))


def _decode(params, s: _State, max_new_each, until, *, cfg: ModelConfig, sampling: SamplingConfig,
            sparsity: SparsityConfig | None, stop: tuple[int, ...]) -> _State:
    """Decode steps until step `until` (a traced int, so one program serves every chunk) or all are done."""

    def cond(s: _State):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: _State):
        key, k_sparse, k_sample = jax.random.split(s.key, 3)
        # A finished sequence appends nothing (n_new 0): its cache length stays put, never past S, while the
        # others run on. Its row still goes through the step (the batch is static); its token is dropped.
        n_new = (~s.done).astype(jnp.int32)
        logits, cache, _ = forward(cfg, params, s.last[:, None], s.cache, n_new=n_new, sparsity=sparsity,
                                   key=k_sparse)
        tok = jnp.where(s.done, cfg.pad_token_id, sample(logits[:, 0], k_sample, sampling))
        n_gen = s.n_gen + n_new
        done = s.done | _stops(tok, stop) | (n_gen >= max_new_each)
        return _State(s.step + 1, s.out.at[:, s.step].set(tok), n_gen, done, tok, cache, key)

    return jax.lax.while_loop(cond, body, s)


_prefill_jit = jax.jit(_prefill, static_argnames=("cfg", "max_new", "max_len", "sampling", "stop"),
                       compiler_options=PREFILL_COMPILER_OPTIONS)
# The state is donated: the decode steps update the cache in place instead of copying it per chunk.
_decode_jit = jax.jit(_decode, static_argnames=("cfg", "sampling", "sparsity", "stop"), donate_argnums=(1,))
_compiled: dict = {}  # (program, static args, argument shapes) -> compiled executable


def _compile(fn, args: tuple, static: dict):
    """Compile once per (program, static arguments, shapes and dtypes), so compile and run time can be told
    apart. args may be arrays or jax.ShapeDtypeStructs."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (fn, treedef, tuple((x.shape, str(x.dtype)) for x in leaves), tuple(sorted(static.items(), key=str)))
    if key not in _compiled:
        _compiled[key] = fn.lower(*args, **static).compile()
    return _compiled[key]


def available_memory() -> tuple[int, str]:
    """(bytes free for new arrays, where): the default device's free memory, or physical RAM on a CPU."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{dev.device_kind} memory free"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM"


def check_memory(cfg: ModelConfig, batch: int, max_len: int, dtype, weights_bytes: int = 0) -> None:
    """Raise a one-line ValueError when the KV cache of `batch` sequences of `max_len` cannot fit (next to
    weights of `weights_bytes` not loaded yet)."""
    need = cache_bytes(cfg, batch, max_len, dtype)
    have, where = available_memory()
    if need + weights_bytes > have:
        weights = f" (+ {weights_bytes / 2**30:.1f} GiB of weights)" if weights_bytes else ""
        raise ValueError(f"the KV cache ({batch} sequences x {max_len} positions, {jnp.dtype(dtype).name}) "
                         f"needs {need / 2**30:.1f} GiB{weights} but there is {have / 2**30:.1f} GiB of {where}: "
                         "use fewer or shorter prompts, or fewer new tokens")


def _prompt_ids(i: int, prompt: Sequence[int]) -> list[int]:
    try:
        return token_ids(prompt)
    except ValueError as e:
        raise ValueError(f"prompt {i}: {e}") from None


def prepare(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
            max_len: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Validate and pad: (tokens [B, Tb], prompt_lens [B], max_new_each [B], max_new, max_len).

    Raises a one-line ValueError for any input that cannot run: no or empty prompts, max_new_tokens < 1,
    token ids that are not integers or lie outside the vocabulary, more positions than the model's context
    length or the cache, a head size the decode kernels do not take.
    """
    check_head_dim(cfg)
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass at least one prompt")
    prompts = [_prompt_ids(i, p) for i, p in enumerate(prompts)]
    lens = np.array([len(p) for p in prompts], np.int64)
    if np.any(lens == 0):
        raise ValueError(f"prompt {int(np.argmin(lens))} is empty: every prompt needs at least one token")
    max_new_each = np.broadcast_to(np.asarray(max_new_tokens, np.int64), lens.shape).copy()
    if np.any(max_new_each < 1):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab_hits = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if vocab_hits:
        raise ValueError(f"token id {vocab_hits[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    need_each = lens + max_new_each
    worst = int(np.argmax(need_each))
    need = int(need_each[worst])
    what = f"prompt {worst} has {lens[worst]} tokens; with max_new_tokens={max_new_each[worst]} it needs {need}"
    if need > cfg.max_positions:
        raise ValueError(f"{what} positions, more than the model's context length of {cfg.max_positions}")
    if max_len is None:
        max_len = min(bucket(need, minimum=128), cfg.max_positions)
    if need > max_len:
        raise ValueError(f"{what} cache positions but the cache holds {max_len}")
    tokens = np.full((len(prompts), bucket(int(lens.max()))), cfg.pad_token_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lens.astype(np.int32), max_new_each.astype(np.int32), int(max_new_each.max()), max_len


def stream(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *,
           max_new_tokens: int | Sequence[int] = 64, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
           stop_tokens: Sequence[int] | None = None, max_len: int | None = None,
           sparsity: SparsityConfig | None = None, chunk_steps: int | None = None) -> Iterator:
    """`generate` as a stream of events: Compiled, Tokens (prefill), Tokens (decode) per chunk, Finished.

    The decode loop runs in chunks of `chunk_steps` steps (None: one chunk) through one jitted program, and
    the tokens of each chunk are yielded as it ends. Every input is checked (and the cache's memory) before
    anything is compiled or allocated.
    """
    if chunk_steps is not None and chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    tokens, lens, max_new_each, max_new, max_len = prepare(cfg, prompts, max_new_tokens, max_len)
    check_memory(cfg, len(prompts), max_len, params["embed"].dtype)
    stop = tuple(cfg.eos_token_ids if stop_tokens is None else stop_tokens)
    args = (params, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(max_new_each), jax.random.key(seed))
    pre_static = dict(cfg=cfg, max_new=max_new, max_len=max_len, sampling=sampling, stop=stop)
    dec_static = dict(cfg=cfg, sampling=sampling, sparsity=sparsity, stop=stop)

    t0 = time.perf_counter()
    prefill = _compile(_prefill_jit, args, pre_static)
    state_shape = jax.eval_shape(functools.partial(_prefill, **pre_static), *args)
    decode = _compile(_decode_jit, (params, state_shape, args[3], jnp.int32(0)), dec_static)
    compile_s = time.perf_counter() - t0
    yield Compiled(compile_s)

    t0 = time.perf_counter()
    s = prefill(*args)
    out, done, n_gen = np.asarray(s.out), np.asarray(s.done), np.asarray(s.n_gen)
    prefill_s = time.perf_counter() - t0
    yield Tokens([[int(t)] for t in out[:, 0]], done.tolist(), "prefill", 0, prefill_s)

    step, decode_s, chunk = 1, 0.0, chunk_steps or max_new
    while step < max_new and not done.all():
        t0 = time.perf_counter()
        s = decode(params, s, args[3], jnp.int32(min(step + chunk, max_new)))
        out, done, n_prev, n_gen = np.asarray(s.out), np.asarray(s.done), n_gen, np.asarray(s.n_gen)
        seconds = time.perf_counter() - t0
        decode_s += seconds
        # A sequence makes one token per step until it is done, so its new tokens are contiguous from `step`.
        new = [[int(t) for t in out[b, step: step + n_gen[b] - n_prev[b]]] for b in range(len(prompts))]
        step = int(s.step)
        yield Tokens(new, done.tolist(), "decode", step - 1, seconds)

    yield Finished(GenerateOutput(out, n_gen, step - 1, compile_s, prefill_s + decode_s, int(lens.sum()),
                                  prefill_s, decode_s))


def generate(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int] = 64, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_tokens: Sequence[int] | None = None, max_len: int | None = None,
             sparsity: SparsityConfig | None = None) -> GenerateOutput:
    """Generate for a batch of token-id prompts of different lengths.

    Each sequence stops at its own stop token (default: the model's EOS ids) or its max_new_tokens
    (an int, or one per prompt). sparsity: how decode steps select heads and neurons (None: dense).
    """
    for event in stream(cfg, params, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                        stop_tokens=stop_tokens, max_len=max_len, sparsity=sparsity):
        if isinstance(event, Finished):
            return event.output
    raise AssertionError("stream ended without a Finished event")
