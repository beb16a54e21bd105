"""Decode-mode log-likelihood: P(continuation | context) computed the way a sparse server decodes.

Each context is prefilled densely except its last token; then the last context token and the continuation
are fed one token per step, teacher-forced, through model.forward's decode path (T == 1: the paged
selective-head attention and selective-GEMM kernels, with the sparsity config), so every continuation token
is predicted by a sparse decode step. (A server's first generated token comes from the dense prefill; here
it does not, so a one-token answer such as mmlu's " A" measures the sparse path too.)

Prefix reuse: the choices of one question share a context. The context is prefilled once into its own
pages; each choice row's page table points at the context's full pages (shared read-only: decode steps
only write past the context) and at private pages after them, the first of which starts as a copy of the
context's last, partial page. Host-side bookkeeping (grouping, page tables) is numpy; the device work is
one jitted program per shape bucket (rows, questions, prefill length, continuation length, all powers of 2).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from polar_jax.cache import PAGE_SIZE, KVCache, init_pool, pages_for
from polar_jax.config import ModelConfig
from polar_jax.generate import bucket
from polar_jax.model import PREFILL_COMPILER_OPTIONS, forward
from polar_jax.sparsity import SparsityConfig, check_routers


@dataclasses.dataclass
class _Batch:
    """Host arrays of one device call (shapes: Q questions, R rows, Tp prefill, Tc steps, W row-table width)."""

    ctx_tokens: np.ndarray  # [Q, Tp] each context but its last token, right-padded
    ctx_lens: np.ndarray  # [Q] prefilled tokens per question (len(context) - 1)
    ctx_table: np.ndarray  # [Q, Mc] the context's pages
    row_table: np.ndarray  # [R, W] shared context pages, then the row's private pages
    copy_src: np.ndarray  # [R] the context page holding the partial page each row continues
    copy_dst: np.ndarray  # [R] the row's first private page
    row_q: np.ndarray  # [R] question of each row
    inputs: np.ndarray  # [R, Tc] tokens fed at each step: context[-1], continuation[:-1]
    targets: np.ndarray  # [R, Tc] tokens scored at each step: continuation
    cont_lens: np.ndarray  # [R] steps per row (0: a padding row)
    num_pages: int
    rows: list[int]  # request index of each real row, in row order


def _steps(longest: int) -> int:
    """Decode steps of a batch whose longest continuation has `longest` tokens (a bucket: few programs)."""
    return bucket(longest, minimum=4)


def _pack(cfg: ModelConfig, requests, questions: list[tuple[tuple[int, ...], list[int]]], page_size: int) -> _Batch:
    """Lay out questions (context, request indices) as one batch of padded arrays and page tables."""
    Z = page_size
    n_rows = sum(len(idx) for _, idx in questions)
    R = bucket(n_rows, minimum=1)  # a short last batch is not padded to the full batch size
    Q = bucket(len(questions), minimum=1)
    Tp = bucket(max(len(c) - 1 for c, _ in questions), minimum=Z)
    Tc = _steps(max(len(requests[i][1]) for _, idx in questions for i in idx))
    Mc = pages_for(Tp, Z)
    Mx = pages_for(Z - 1 + Tc, Z)  # a row's positions n .. n+Tc-1 start at offset n % Z <= Z - 1 of its first page
    W = Mc + Mx
    ctx_tokens = np.full((Q, Tp), cfg.pad_token_id, np.int32)
    ctx_lens = np.zeros(Q, np.int32)
    ctx_table = np.arange(Q * Mc, dtype=np.int32).reshape(Q, Mc)
    private = Q * Mc + np.arange(R * Mx, dtype=np.int32).reshape(R, Mx)
    row_table = np.empty((R, W), np.int32)
    row_table[:] = private[:, -1:]  # entries past a row's last page are never read; keep them in range
    copy_src, copy_dst = np.zeros(R, np.int32), private[:, 0].copy()
    row_q = np.zeros(R, np.int32)
    inputs = np.full((R, Tc), cfg.pad_token_id, np.int32)
    targets = np.zeros((R, Tc), np.int32)
    cont_lens = np.zeros(R, np.int32)
    rows, r = [], 0
    for q, (ctx, idx) in enumerate(questions):
        n = len(ctx) - 1
        ctx_tokens[q, :n], ctx_lens[q] = ctx[:-1], n
        full = n // Z  # the context's full pages: shared by every choice row
        for i in idx:
            cont = requests[i][1]
            row_table[r, :full] = ctx_table[q, :full]
            row_table[r, full:full + Mx] = private[r]
            copy_src[r] = ctx_table[q, min(full, Mc - 1)]  # the partial page (when n % Z == 0, its junk is overwritten)
            row_q[r] = q
            inputs[r, :len(cont)] = (ctx[-1], *cont[:-1])
            targets[r, :len(cont)] = cont
            cont_lens[r] = len(cont)
            rows.append(i)
            r += 1
    return _Batch(ctx_tokens, ctx_lens, ctx_table, row_table, copy_src, copy_dst, row_q, inputs, targets, cont_lens,
                  Q * Mc + R * Mx, rows)


def _score(params, ctx_tokens, ctx_lens, ctx_table, row_table, copy_src, copy_dst, row_q, inputs, targets,
           cont_lens, key, *, cfg: ModelConfig, sparsity: SparsityConfig | None, num_pages: int, page_size: int):
    """(log-likelihood [R] fp32, greedy [R] bool) of each row's continuation; see _Batch for the shapes."""
    k, v = init_pool(cfg, num_pages, page_size, params["embed"].dtype)
    cache = KVCache(k, v, ctx_table, jnp.zeros_like(ctx_lens))
    _, cache, _ = forward(cfg, params, ctx_tokens, cache, n_new=ctx_lens, last_only=True)  # dense prefill
    # Each row continues its context in a private copy of the context's last (partial) page.
    k = cache.k.at[:, copy_dst].set(cache.k[:, copy_src])
    v = cache.v.at[:, copy_dst].set(cache.v[:, copy_src])
    rows = KVCache(k, v, row_table, ctx_lens[row_q])

    def step(cache, t):
        live = t < cont_lens  # [R]: rows past their continuation (or padding) append nothing
        logits, cache, _ = forward(cfg, params, inputs[:, t, None], cache, n_new=live.astype(jnp.int32),
                                   sparsity=sparsity, key=jax.random.fold_in(key, t))
        logp = jax.nn.log_softmax(logits[:, 0], axis=-1)  # [R, V]
        target = targets[:, t]
        picked = jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]  # [R]
        greedy = jnp.argmax(logp, axis=-1) == target
        return cache, (jnp.where(live, picked, 0.0), greedy | ~live)

    _, (lp, greedy) = jax.lax.scan(step, rows, jnp.arange(inputs.shape[1]))  # [Tc, R]
    return lp.sum(0), greedy.all(0)


_score_jit = jax.jit(_score, static_argnames=("cfg", "sparsity", "num_pages", "page_size"),
                     compiler_options=PREFILL_COMPILER_OPTIONS)


def score_batch(cfg: ModelConfig, params: dict, p: _Batch, key, sparsity: SparsityConfig | None, page_size: int):
    """Launch one packed batch on the device: (log-likelihood [R], greedy [R]), not waited for."""
    arrays = (p.ctx_tokens, p.ctx_lens, p.ctx_table, p.row_table, p.copy_src, p.copy_dst, p.row_q, p.inputs,
              p.targets, p.cont_lens)
    return _score_jit(params, *map(jnp.asarray, arrays), key, cfg=cfg, sparsity=sparsity, num_pages=p.num_pages,
                      page_size=page_size)


def plan_batches(requests, batch_size: int) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """Batches of questions (context, indices of the requests with that context), up to batch_size rows each.

    Every row of a batch takes as many decode steps as the batch's longest continuation (its bucket), so
    questions go longest continuation first (then longest context) and a batch never mixes continuation
    buckets: the few questions with long answers do not make a full batch of short ones step as long."""
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        by_ctx.setdefault(ctx, []).append(i)
    longest = {ctx: max(len(requests[i][1]) for i in idx) for ctx, idx in by_ctx.items()}
    questions = sorted(by_ctx.items(), key=lambda q: (-longest[q[0]], -len(q[0])))
    batches, cur, n = [], [], 0
    for q in questions:
        if cur and (n + len(q[1]) > batch_size or _steps(longest[q[0]]) != _steps(longest[cur[0][0]])):
            batches.append(cur)
            cur, n = [], 0
        cur.append(q)
        n += len(q[1])
    if cur:
        batches.append(cur)
    return batches


def loglikelihood(cfg: ModelConfig, params: dict, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                  sparsity: SparsityConfig | None = None, batch_size: int = 32, seed: int = 0,
                  page_size: int = PAGE_SIZE, progress: bool = False) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding reproduces the continuation) per request.

    requests: (context token ids, continuation token ids), both non-empty. Requests with equal contexts
    share one prefill; batches hold up to `batch_size` continuation rows (a question with more choices gets
    a batch of its own). The random head source draws per batch from `seed`.
    """
    requests = [(tuple(int(t) for t in c), tuple(int(t) for t in x)) for c, x in requests]
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation need at least one token each "
                             f"(got {len(ctx)} and {len(cont)})")
        if len(ctx) + len(cont) - 1 > cfg.max_positions:
            raise ValueError(f"request {i}: {len(ctx)} context + {len(cont)} continuation tokens exceed the "
                             f"model's {cfg.max_positions} positions; truncate the context")
        bad = [t for t in ctx + cont if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if sparsity is not None:
        check_routers(cfg, params, sparsity)
    batches = plan_batches(requests, batch_size)
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    key = jax.random.key(seed)

    def collect(rows, lp, greedy):
        lp, greedy = np.asarray(lp), np.asarray(greedy)
        for r, i in enumerate(rows):
            out[i] = (float(lp[r]), bool(greedy[r]))

    in_flight = None  # one batch stays in flight: the host packs batch b + 1 while the device scores batch b
    for b, qs in enumerate(tqdm(batches, desc="loglikelihood", unit="batch", disable=not progress)):
        p = _pack(cfg, requests, qs, page_size)
        launched = (p.rows, *score_batch(cfg, params, p, jax.random.fold_in(key, b), sparsity, page_size))
        if in_flight is not None:
            collect(*in_flight)
        in_flight = launched
    if in_flight is not None:
        collect(*in_flight)
    return out
