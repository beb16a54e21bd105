"""Dynamic per-layer MLP top-k per batch size, and the sparsity config that generate / eval / benchmarks read.

At decode time each token of a batch takes its router's top-k neurons and the layer computes their union.
For a batch size B the k of a layer is the smallest multiple of 128 whose union recall reaches the target:
  recall(k) = |union_i topk_i(router) & union_i active_i| / |union_i active_i|   over batches of B tokens.
A neuron is in the union of top-k sets iff its best rank over the batch is < k, so one pass of ranks gives
recall at every k at once. Batches are drawn from the test split of the collected tokens (training/splits.py:
the router neither trained nor stopped early on them), so the k is not tuned to tokens the router memorised.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from polar_jax.sparsity import SparsityConfig
from polar_jax.sparsity import check_routers
from training.collect import check_identity, has_mlp_labels, load_data, read_manifest
from training.routers import DEFAULT_ATTN_DENSITY, mlp_logits
from training.splits import range_of_test
from training.train import METRICS_FILE

K_MULTIPLE = 128  # the selective GEMM kernels work in blocks; a k between multiples buys nothing


def ranks(logits: np.ndarray) -> np.ndarray:
    """[n, F] scores -> [n, F] int32 rank of each neuron in its token's ordering (0 = largest)."""
    order = np.argsort(-logits, axis=1, kind="stable")
    r = np.empty(logits.shape, np.int32)
    np.put_along_axis(r, order, np.arange(logits.shape[1], dtype=np.int32)[None], axis=1)
    return r


def union_recall(rank: np.ndarray, active: np.ndarray, batch_size: int, n_batches: int,
                 rng: np.random.Generator) -> np.ndarray:
    """recall[k] for k = 0..F: the batch-union recall of per-token top-k, pooled over n_batches random
    batches of batch_size distinct tokens. rank, active: [n, F]."""
    n, F = rank.shape
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} needs at least that many calibration tokens, have {n}")
    hits, total = np.zeros(F + 1, np.int64), 0
    for _ in range(n_batches):
        b = rng.choice(n, batch_size, replace=False)
        best = rank[b].min(axis=0)  # [F] best rank of each neuron over the batch
        true = active[b].any(axis=0)  # [F] the batch union of truly active neurons
        hits += np.bincount(best[true] + 1, minlength=F + 1)  # found by every k > best
        total += int(true.sum())
    return np.cumsum(hits) / max(total, 1) if total else np.ones(F + 1)


def min_k(recall: np.ndarray, target: float, multiple: int = K_MULTIPLE) -> tuple[int, float]:
    """(smallest k in {multiple, 2*multiple, ..., F} with recall[k] >= target, its recall)."""
    F = len(recall) - 1
    candidates = list(range(multiple, F, multiple)) + [F]
    for k in candidates:
        if recall[k] >= target:
            return k, float(recall[k])
    return F, float(recall[F])


def trained_attn_density(model_dir) -> float | None:
    """The density the model's attention router was trained for (its routers_metrics.json), if known."""
    path = Path(model_dir) / METRICS_FILE
    try:
        return float(json.loads(path.read_text())["attn"]["density"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def calibrate(model_dir, data_dir, out_path, *, batch_sizes=(1, 8, 32, 64, 128), recall: float = 0.99,
              attn_density: float | None = None, n_batches: int = 16, seed: int = 0,
              progress: bool = True) -> tuple[SparsityConfig, dict]:
    """Write a SparsityConfig JSON: uniform attention density (dense layers kept dense) and, for models with
    an MLP router, the per-layer router top-k table over batch_sizes. Returns (config, report).

    attn_density None: the density the attention router was trained for, else DEFAULT_ATTN_DENSITY."""
    from polar_jax.checkpoint import check_writable, load

    if not 0 < recall <= 1:
        raise ValueError(f"--recall must lie in (0, 1], got {recall}")
    trained = trained_attn_density(model_dir)
    if attn_density is None:
        attn_density = DEFAULT_ATTN_DENSITY if trained is None else trained
        print(f"attention density {attn_density:g} ("
              + ("the default: no routers_metrics.json" if trained is None else "the router's training density")
              + "; --attn-density sets another)")
    elif trained is not None and attn_density < 1 and not np.isclose(attn_density, trained):
        warnings.warn(f"--attn-density {attn_density:g} differs from the density the attention router of {model_dir} "
                      f"was trained for ({trained:g}); its top-k labels were made for that one", stacklevel=2)
    if not 0 < attn_density <= 1:
        raise ValueError(f"--attn-density must lie in (0, 1], got {attn_density}")
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {batch_sizes}")
    check_writable(out_path)
    cfg, params, _ = load(model_dir)
    check_identity(read_manifest(data_dir), cfg, params, data_dir)  # even where only attention is calibrated
    dense_layers = (0,)
    L, F = cfg.n_layers, cfg.mlp_dim
    routers = params.get("routers") or {}
    attn = "router" if attn_density < 1 else "all"
    density = tuple(1.0 if l in dense_layers else attn_density for l in range(L))
    check_routers(cfg, params, SparsityConfig(attn=attn, attn_density=density), where=str(model_dir))
    report = {"model": cfg.name, "recall_target": recall, "attn_density": attn_density, "batch_sizes": batch_sizes}

    if "mlp" not in routers or not has_mlp_labels(cfg):
        why = ("it has no MLP router (train one with `polar train-routers --mlp`)" if has_mlp_labels(cfg)
               else f"MLP neuron sparsity needs a ReLU model and {cfg.name} uses {cfg.activation}")
        print(f"note: MLP stays dense for {model_dir}: {why}")
        sp = SparsityConfig(attn=attn, attn_density=density, dense_layers=dense_layers)
    else:
        ds = load_data(data_dir)  # its identity was checked above
        t0, t1 = range_of_test(ds.n, ds.manifest["seq_len"])
        n_cal = t1 - t0
        if n_cal < batch_sizes[-1]:
            raise ValueError(f"the test split of {data_dir} holds {n_cal} tokens; batch size {batch_sizes[-1]} "
                             "needs at least that many (collect more tokens)")
        cal = slice(t0, t1)
        rng = np.random.default_rng(seed)
        table = {b: [F] * L for b in batch_sizes}
        achieved = {b: [1.0] * L for b in batch_sizes}
        layer_logits = jax.jit(mlp_logits)
        for l in tqdm(range(L), desc="calibrate", unit="layer", disable=not progress):
            if l in dense_layers:
                continue
            r = jax.tree_util.tree_map(lambda a: a[l], routers["mlp"])
            rank = ranks(np.asarray(layer_logits(r, np.asarray(ds.router_in[l, cal], np.float32))))
            active = np.unpackbits(np.asarray(ds.mlp_active[l, cal]), axis=-1, count=F).astype(bool)  # [n, F]
            for b in batch_sizes:
                table[b][l], achieved[b][l] = min_k(union_recall(rank, active, b, n_batches, rng), recall)
        sp = SparsityConfig(attn=attn, attn_density=density, mlp="router", dense_layers=dense_layers,
                            mlp_k_table=tuple((b, tuple(table[b])) for b in batch_sizes))
        report |= {"calibration_tokens": [t0, t1], "mlp_k": {str(b): table[b] for b in batch_sizes},
                   "union_recall": {str(b): achieved[b] for b in batch_sizes}}
        print(format_k_table(table, F))
    sp.to_json(out_path, meta={"made_by": "polar calibrate", **report})
    print(f"wrote {out_path}")
    return sp, report


def format_k_table(table: dict[int, list[int]], F: int) -> str:
    bs = sorted(table)
    L = len(table[bs[0]])
    head = f"MLP router top-k per layer (F={F}) by batch size\n{'layer':>5} " + " ".join(
        f"{'B=' + str(b):>7}" for b in bs)
    rows = [f"{l:>5} " + " ".join(f"{table[b][l]:>7}" for b in bs) for l in range(L)]
    mean = f"{'mean':>5} " + " ".join(f"{np.mean(table[b]) / F:>7.1%}" for b in bs)
    return "\n".join([head, *rows, mean])
