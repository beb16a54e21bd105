"""Per-row sampling inside one batch: each row has its own temperature, top-k, top-p, min-p, penalties and seed.

A request's n-th token is drawn with the key fold_in(key(seed), n), so a seeded request reproduces its
tokens whatever else shares its batch. Temperature 0 is greedy. Logit biases (OpenAI's logit_bias, and
-inf on the tokens that would end a request before its min_tokens) and then the penalties (as vLLM's) change
the logits before anything else, greedy choice included: repetition divides a positive logit (multiplies a negative one)
of every token in the prompt or the output so far; frequency and presence subtract, per token of the output
so far, its count times the one and the other once. logprob: the model's log-probability of the chosen token
(log-softmax of the raw logits, before penalties, temperature and filtering); beside it the k most likely
tokens of that distribution and their logprobs (OpenAI's top_logprobs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.threshold_search import largest_threshold


def _filtered(z: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """z [B, V] with everything outside each row's top-k and nucleus, and every token less likely than min_p
    times the most likely one, set to -inf; rows with none of them (top_k 0, top_p 1, min_p 0) exactly as
    they were, so a row samples the same whatever shares its batch.

    As vLLM: the top-k cut keeps every token at least as likely as the k-th; the nucleus is the smallest set of
    the most likely of those whose renormalised mass reaches top_p (all tokens tied with its least likely
    included). Both cuts are found by threshold searches (pallas_kernels.threshold_search), in place of a
    [B, V] sort and cumulative sum (benchmarks/probe_sampler_filter.md)."""
    V = z.shape[-1]
    z_max, z_min = jnp.max(z, axis=-1), jnp.min(z, axis=-1)  # [B]
    has_k = (top_k > 0) & (top_k < V)  # [B] (the other rows are not searched: lo = hi)
    kth = largest_threshold(z, top_k.astype(jnp.float32), z_min, jnp.where(has_k, z_max, z_min))  # [B] k-th value
    need = top_p * jnp.sum(jnp.where(z >= kth[:, None], jnp.exp(z - z_max[:, None]), 0.0), axis=-1)  # [B] top_p
    # of the top-k tokens' mass
    nucleus = largest_threshold(z, need, kth, jnp.where(top_p < 1, z_max, kth), shift=z_max)  # [B] (top_p 1: no
    # cut, whatever the rounding)
    cutoff = jnp.maximum(nucleus, kth)  # [B]
    # min-p: p >= min_p * p_max, that is z >= z_max + log(min_p) (-inf for min_p 0: no cut)
    cutoff = jnp.maximum(cutoff, z_max + jnp.log(min_p))
    keep = ((top_k <= 0) | (top_k >= V)) & (top_p >= 1) & (min_p <= 0)  # [B] rows that filter nothing
    return jnp.where((z < cutoff[:, None]) & ~keep[:, None], -jnp.inf, z)


def biased(logits: jax.Array, ids: jax.Array, values: jax.Array) -> jax.Array:
    """logits [B, V] f32 plus values [B, K] f32 at token ids [B, K] int32 of each row (-1: no entry)."""
    B, V = logits.shape
    return logits.at[jnp.arange(B)[:, None], jnp.where(ids >= 0, ids, V)].add(values, mode="drop")


def penalized(logits: jax.Array, history: jax.Array, out_start: jax.Array, presence: jax.Array,
              frequency: jax.Array, repetition: jax.Array) -> jax.Array:
    """logits [B, V] f32 with each row's penalties applied (vLLM's order: repetition, then frequency and
    presence). history [B, T] int32: the row's prompt and output tokens so far, negative past them; out_start [B]:
    where its output begins in history; presence, frequency, repetition [B] f32 (0, 0, 1: no change, exactly)."""
    B, V = logits.shape
    rows = jnp.arange(B)[:, None]
    known = history >= 0
    ids = jnp.where(known, history, 0)
    is_output = known & (jnp.arange(history.shape[1])[None, :] >= out_start[:, None])
    counts = jnp.zeros((B, V), jnp.float32).at[rows, ids].add(is_output.astype(jnp.float32))  # output counts
    seen = jnp.zeros((B, V), jnp.int32).at[rows, ids].add(known.astype(jnp.int32)) > 0  # prompt or output
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


GROUP = 128  # tokens per group of most_likely's first pass


def most_likely(logp: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k most likely tokens of each row of logp [N, V] and their values, most likely first (lowest id
    first among equals): ids [N, k] int32, values [N, k]. k = 1 is an argmax, not a top-k: the common case,
    and cheaper.

    For k > 1, in two passes: the k groups of GROUP consecutive tokens with the largest maxima hold the k
    largest values (a group without any of them has a maximum no larger than the k-th), so one max-reduction
    over [N, V] and a top-k over [N, k * GROUP] candidates replace a top-k over [N, V], which ran 8x slower
    on an H100 at k = 20 (benchmarks/NOTES.md, fifteenth session)."""
    if k == 1:
        return jnp.argmax(logp, axis=-1).astype(jnp.int32)[:, None], jnp.max(logp, axis=-1)[:, None]
    N, V = logp.shape
    G = -(-V // GROUP)  # groups
    if G <= k:
        values, ids = jax.lax.top_k(logp, k)
        return ids.astype(jnp.int32), values
    padded = jnp.pad(logp, ((0, 0), (0, G * GROUP - V)), constant_values=-jnp.inf).reshape(N, G, GROUP)
    _, groups = jax.lax.top_k(jnp.max(padded, axis=-1), k)  # [N, k]
    groups = jnp.sort(groups, axis=-1)  # candidates in token order: ties keep the lowest id first
    cand = jnp.take_along_axis(padded, groups[:, :, None], axis=1).reshape(N, k * GROUP)
    values, at = jax.lax.top_k(cand, k)  # [N, k]
    ids = jnp.take_along_axis(groups, at // GROUP, axis=-1) * GROUP + at % GROUP
    return jnp.minimum(ids, V - 1).astype(jnp.int32), values


def sample_rows(logits: jax.Array, temps: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array,
                seeds: jax.Array, steps: jax.Array, *, filtered: bool = True, k: int = 1,
                penalties: tuple | None = None, bias: tuple | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """logits [B, V] f32; temps, top_p, min_p [B] f32; top_k [B] int32 (0: off); seeds [B] uint32; steps [B]
    int32; penalties: None, or `penalized`'s (history, out_start, presence, frequency, repetition); bias: None,
    or `biased`'s (ids, values).

    filtered (static): apply top-k / top-p / min-p; False skips the cut-off searches, valid when no row needs them
    (`SamplingParams.filters` of no row). The choice is the caller's, made on the host: a device-side `lax.cond`
    would make the GPU program wait for the host to read its predicate, and the dispatch of the whole step block.
    k (static): how many of the most likely tokens to report.
    Returns (tokens [B] int32, logprobs [B] f32, top_tokens [B, k] int32, top_logprobs [B, k] f32): the
    sampled tokens and their log-probabilities, and each row's k most likely tokens (the first is the argmax
    of the raw logits, the greedy choice where no bias or penalty applies) and their log-probabilities;
    logprobs and top_logprobs come from one log-softmax of the raw logits, so they are equal where the
    sampled token is one of the most likely.
    """
    logits = logits.astype(jnp.float32)
    chosen_from = logits if bias is None else biased(logits, *bias)
    if penalties is not None:
        chosen_from = penalized(chosen_from, *penalties)
    greedy = jnp.argmax(chosen_from, axis=-1).astype(jnp.int32)
    z = chosen_from / jnp.where(temps > 0, temps, 1.0)[:, None]
    if filtered:
        z = _filtered(z, top_k, top_p, min_p)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
    drawn = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
    tokens = jnp.where(temps > 0, drawn, greedy)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
    logprobs = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs, *most_likely(logp, k)
