"""The most likely next token at every prompt position, for `echo` + `logprobs` completions.

OpenAI's `top_logprobs` (and lm-evaluation-harness's local-completions, which compares each prompt token's
logprob with the best one to decide whether a continuation is greedy) need the top token at each position;
the engine reports only the logprob of the token that is there. This runs one dense forward over the prompt
(as the engine's prefill is dense) on a static cache, its length padded to a power of two so that few
programs are compiled. It runs off the engine thread: it only reads the parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.cache import init_cache
from polar_jax.config import ModelConfig
from polar_jax.model import PREFILL_COMPILER_OPTIONS, forward

_MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=PREFILL_COMPILER_OPTIONS)
def _top1(cfg: ModelConfig, params: dict, tokens: jax.Array):
    """tokens [1, T] -> (argmax ids [T], their logprobs [T]) of the next token after each position."""
    cache = init_cache(cfg, 1, tokens.shape[1], params["embed"].dtype)
    logits, _, _ = forward(cfg, params, tokens, cache)  # [1, T, V] fp32
    logp = jax.nn.log_softmax(logits[0], axis=-1)  # [T, V]
    return jnp.argmax(logp, axis=-1), jnp.max(logp, axis=-1)


def prompt_top1(cfg: ModelConfig, params: dict, ids: list[int], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], logprobs [n]) of the most likely token after each of the n prompt positions.

    limit: the longest padded length to compile for (the engine's max_model_len).
    """
    n = len(ids)
    bucket = min(max(_MIN_BUCKET, 1 << (n - 1).bit_length()), max(limit, n))
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :n] = ids  # padding comes after: causal attention keeps it out of the real positions
    top_ids, top_lp = _top1(cfg, params, jnp.asarray(tokens))
    return np.asarray(top_ids)[:n], np.asarray(top_lp)[:n]
