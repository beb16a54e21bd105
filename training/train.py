"""Router training: weighted BCE, AdamW (optax), every layer at once (vmap over L), early stopping.

Both routers are per-layer classifiers of one token's router input h [D]: the attention router predicts
which KV groups are among the top-k by output norm, the MLP router which neurons are active. Layers are
independent, so their parameters are stacked on L and the per-layer loss is vmapped; the summed loss gives
each layer its own gradient, and AdamW normalises each parameter on its own, so this is L separate runs.
Three disjoint splits (training/splits.py): train for the steps, val for early stopping (each layer keeps
its parameters from its best validation epoch), test for the metrics reported (nothing was tuned on it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from training.collect import has_mlp_labels, load_data
from training.routers import attn_group_count, attn_labels, attn_logits, cast, init_attn, init_mlp, mlp_logits
from training.splits import TEST_FRAC, Splits, split


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 1024  # tokens per step (every layer sees the same tokens)
    max_epochs: int = 30
    patience: int = 3  # epochs without any layer improving its validation loss before stopping
    val_frac: float = 0.1  # of the tokens before the test split (training/splits.py)
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.val_frac < 1:
            raise ValueError(f"validation fraction must lie in (0, 1), got {self.val_frac}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError(f"batch size, epochs and patience must be >= 1: {self}")


def weighted_bce(logits: jax.Array, labels: jax.Array, pos_weight: jax.Array) -> jax.Array:
    """Mean binary cross-entropy with positives weighted by pos_weight (= negatives / positives, so both
    classes weigh the same in total: with 3 % of neurons active, plain BCE would learn "all off")."""
    y = labels.astype(jnp.float32)
    return -jnp.mean(pos_weight * y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits))


class Labels:
    """Labels [L, n, X] bool, held on device as uint8, optionally bit-packed over X (MLP: X = F)."""

    def __init__(self, array: np.ndarray, packed_width: int | None = None):
        self.array = jnp.asarray(np.asarray(array, np.uint8))
        self.width = packed_width

    def take(self, idx: jax.Array, array: jax.Array | None = None) -> jax.Array:
        """Labels of tokens idx: [L, b, X] bool. Pass `array` (this object's array) to read it as a traced
        jit argument rather than a closed-over constant."""
        y = (self.array if array is None else array)[:, idx]  # [L, b, X or X/8]
        if self.width is not None:
            y = jnp.unpackbits(y, axis=-1, count=self.width)
        return y.astype(jnp.bool_)


def positive_rate(labels: Labels, idx: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """[L] fraction of positive labels over tokens idx."""
    total = np.zeros(labels.array.shape[0])
    for i in range(0, len(idx), chunk):
        y = labels.take(jnp.asarray(idx[i: i + chunk]))
        total += np.asarray(jnp.sum(y, axis=(1, 2), dtype=jnp.float32))
    X = labels.width or labels.array.shape[-1]
    return total / (len(idx) * X)


def _metrics_fn(apply: Callable, topk: int | None):
    """jit fn(params, x [L, b, D], y [L, b, X], pw [L]) -> per-layer sums [L, 5 or 6]:
    loss*b, tp, fp, fn, positives, and (with topk) hits of the router's top-k among the labels."""

    def per_layer(p, x, y, pw):
        z = apply(p, x)  # [b, X]
        pred = z > 0
        out = [weighted_bce(z, y, pw) * x.shape[0], jnp.sum(pred & y), jnp.sum(pred & ~y), jnp.sum(~pred & y),
               jnp.sum(y)]
        if topk is not None:
            _, ids = jax.lax.top_k(z, topk)  # [b, k]
            out.append(jnp.sum(jnp.take_along_axis(y, ids, axis=-1)))
        return jnp.stack([jnp.asarray(o, jnp.float32) for o in out])

    return jax.jit(jax.vmap(per_layer))


def evaluate(apply, params, X: jax.Array, labels: Labels, idx: np.ndarray, pos_weight, topk=None,
             chunk: int = 4096) -> dict[str, np.ndarray]:
    """Per-layer metrics over tokens idx: loss, recall, precision (at p = 0.5), positive rate,
    and with topk the top-k recall (share of the true top-k that the router's top-k finds)."""
    fn = _metrics_fn(apply, topk)
    tot = 0
    for i in range(0, len(idx), chunk):
        j = jnp.asarray(idx[i: i + chunk])
        tot = tot + np.asarray(fn(params, X[:, j].astype(jnp.float32), labels.take(j), pos_weight), np.float64)
    loss, tp, fp, fn_, pos = (tot[:, c] for c in range(5))
    out = {"loss": loss / len(idx), "recall": tp / np.maximum(tp + fn_, 1), "precision": tp / np.maximum(tp + fp, 1),
           "positive_rate": pos / (len(idx) * (labels.width or labels.array.shape[-1]))}
    if topk is not None:
        out["topk_recall"] = tot[:, 5] / np.maximum(pos, 1)
    return out


@dataclasses.dataclass
class TrainResult:
    params: dict  # stacked [L, ...] router parameters (each layer at its best validation epoch)
    metrics: dict[str, np.ndarray]  # per-layer metrics of those parameters on the test split
    history: list[dict]  # per epoch: train loss, mean validation loss, layers improved
    epochs: int


def train(apply: Callable, init_params: dict, X: np.ndarray, labels: Labels, tc: TrainConfig, splits: Splits,
          topk: int | None = None, progress: bool = True, desc: str = "train") -> TrainResult:
    """Fit stacked per-layer routers `apply(p_l, x [b, D]) -> logits [b, X]` to labels [L, n, X].

    X [L, n, D] router inputs (any float dtype; cast to f32 per batch). splits: disjoint token indices
    into n: steps on train, early stopping on val, the returned metrics on test.
    """
    L = X.shape[0]
    train_idx, val_idx, test_idx = splits.train, splits.val, splits.test
    if len(np.intersect1d(train_idx, val_idx)) or len(np.intersect1d(test_idx, np.r_[train_idx, val_idx])):
        raise ValueError("train, validation and test tokens must be disjoint")
    bs = min(tc.batch_size, len(train_idx))
    Xd = jnp.asarray(X)
    rate = positive_rate(labels, train_idx)
    # Balance the classes per layer; clipped so a layer with (almost) no positives does not blow up.
    pos_weight = jnp.asarray(np.clip((1 - rate) / np.maximum(rate, 1e-6), 1e-2, 1e3), jnp.float32)

    opt = optax.adamw(tc.lr, weight_decay=tc.weight_decay)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), init_params)
    opt_state = opt.init(params)

    def loss_fn(p, X, Y, pw, idx):
        x = X[:, idx].astype(jnp.float32)  # [L, b, D]
        per_layer = jax.vmap(lambda pl, xl, yl, wl: weighted_bce(apply(pl, xl), yl, wl))(
            p, x, labels.take(idx, Y), pw)  # [L]
        return jnp.sum(per_layer)

    # The data are arguments, not closed over: a closed-over array would be baked into the program.
    @jax.jit
    def run_epoch(p, s, X, Y, pw, batches):  # batches [steps, bs]: one scan, XLA reuses buffers across steps
        def step(carry, idx):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, X, Y, pw, idx)
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s), loss / L

        (p, s), losses = jax.lax.scan(step, (p, s), batches)
        return p, s, jnp.mean(losses)

    rng = np.random.default_rng(tc.seed)
    best_params, best_loss = params, evaluate(apply, params, Xd, labels, val_idx, pos_weight, topk)["loss"]
    history, stale, epoch = [], 0, 0
    bar = tqdm(range(tc.max_epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        steps = len(train_idx) // bs
        batches = rng.permutation(train_idx)[: steps * bs].reshape(steps, bs)
        params, opt_state, train_loss = run_epoch(params, opt_state, Xd, labels.array, pos_weight,
                                                     jnp.asarray(batches))
        m = evaluate(apply, params, Xd, labels, val_idx, pos_weight, topk)
        better = m["loss"] < best_loss - 1e-4 * np.abs(best_loss)  # [L]
        keep = jnp.asarray(better)
        best_params = jax.tree_util.tree_map(
            lambda b, p: jnp.where(keep.reshape((-1,) + (1,) * (p.ndim - 1)), p, b), best_params, params)
        best_loss = np.where(better, m["loss"], best_loss)
        train_loss = float(train_loss)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": float(np.mean(m["loss"])),
                        "layers_improved": int(better.sum())})
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{np.mean(m['loss']):.4f}", improved=int(better.sum()))
        stale = 0 if better.any() else stale + 1
        if stale >= tc.patience:
            break
    bar.close()
    test = evaluate(apply, best_params, Xd, labels, test_idx, pos_weight, topk)
    return TrainResult(best_params, test, history, len(history))


def format_table(metrics: dict[str, np.ndarray], title: str) -> str:
    """A per-layer text table of router metrics."""
    cols = [c for c in ("loss", "positive_rate", "recall", "precision", "topk_recall") if c in metrics]
    head = f"{'layer':>5} " + " ".join(f"{c:>13}" for c in cols)
    rows = [f"{l:>5} " + " ".join(f"{metrics[c][l]:>13.4f}" for c in cols) for l in range(len(metrics["loss"]))]
    mean = f"{'mean':>5} " + " ".join(f"{np.mean(metrics[c]):>13.4f}" for c in cols)
    return "\n".join([title, head, *rows, mean])


# ---------------------------------------------------------------------------------------------------
# the `polar train-routers` pipeline

METRICS_FILE = "routers_metrics.json"


def _check_out(out_dir: Path, overwrite: bool) -> None:
    """Fail before training, not after it, when the output cannot be written."""
    from polar_jax.checkpoint import check_writable

    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it (it may be --model itself)")
    check_writable(out_dir, file=False)


def train_routers(model_dir, data_dir, out_dir, *, attn_density: float | None = None, attn_groups: int | None = None,
                  mlp: bool = False,
                  tc: TrainConfig = TrainConfig(), max_tokens: int | None = None, overwrite: bool = False,
                  progress: bool = True) -> dict:
    """Train the attention router (and the MLP router with mlp=True) on collected data; write the model
    with params["routers"] to out_dir. Returns the report also written to out_dir/routers_metrics.json.

    The attention labels are the top-k KV groups by output norm, k = attn_groups, or else the attn_density
    fraction of the groups (the density the router will run at)."""
    from polar_jax.checkpoint import load, save, write_whole

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg, params, tokenizer = load(model_dir)
    k = attn_group_count(cfg.n_kv_heads, attn_density, attn_groups)
    if mlp and not has_mlp_labels(cfg):
        raise ValueError(f"--mlp needs a ReLU MLP (a neuron is active when act > 0); {cfg.name} uses "
                         f"{'gated ' if cfg.gated_mlp else ''}{cfg.activation}")
    _check_out(out_dir, overwrite)
    ds = load_data(data_dir, cfg, params)
    if mlp and ds.mlp_active is None:
        raise ValueError(f"{data_dir} holds no MLP activity; collect it again with this ReLU model")
    sp = split(ds.n, ds.manifest["seq_len"], tc.val_frac, max_tokens)
    # Only the tokens of the three splits travel to the device; indices are renumbered into that selection.
    used = np.r_[sp.train, sp.val, sp.test]
    a, b = len(sp.train), len(sp.train) + len(sp.val)
    local = Splits(np.arange(a), np.arange(a, b), np.arange(b, len(used)))
    X = ds.router_in[:, used]  # [L, n_used, D]
    print(f"{ds.n} tokens from {ds.manifest['source']}: train {len(sp.train)}, validation {len(sp.val)}, "
          f"test {len(sp.test)} (the last {TEST_FRAC:.0%}; metrics below are on it); {cfg.n_layers} layers, "
          f"{cfg.n_kv_heads} KV groups (labels: top {k} by output norm)")
    key_a, key_m = jax.random.split(jax.random.key(tc.seed))
    report = {"model": cfg.name, "data": str(Path(data_dir).resolve()), "tokens": ds.n,
              "source": ds.manifest["source"], "train_config": dataclasses.asdict(tc), "splits": sp.ranges(),
              "metrics_split": "test"}

    labels = np.concatenate([np.asarray(attn_labels(ds.head_norms[:, used[i: i + 65536]], cfg.n_kv_heads, k))
                             for i in range(0, len(used), 65536)], axis=1)  # [L, n_used, K]
    res = train(attn_logits, init_attn(cfg, key_a), X, Labels(labels), tc, local, topk=k, progress=progress,
                desc="attention router")
    routers = dict(params.get("routers") or {})
    routers["attn"] = res.params
    report["attn"] = {"topk": k, "density": k / cfg.n_kv_heads, "epochs": res.epochs, "history": res.history,
                      "metrics": {m: v.tolist() for m, v in res.metrics.items()}}
    print(format_table(res.metrics, f"attention router (test split; top-{k} of {cfg.n_kv_heads} groups):"))
    if mlp:
        res = train(mlp_logits, init_mlp(cfg, key_m), X, Labels(ds.mlp_active[:, used], cfg.mlp_dim), tc, local,
                    progress=progress, desc="MLP router")
        routers["mlp"] = res.params
        report["mlp"] = {"epochs": res.epochs, "history": res.history,
                         "metrics": {m: v.tolist() for m, v in res.metrics.items()}}
        print(format_table(res.metrics, "MLP router (test split; active = act > 0, predicted = p > 0.5):"))

    params = {**params, "routers": cast(routers, params["embed"].dtype)}
    # Atomic: out_dir (even when it is model_dir) is replaced only once the new directory is complete.
    save(out_dir, cfg, params, tokenizer_dir=model_dir if tokenizer is not None else None, overwrite=overwrite)
    write_whole(out_dir / METRICS_FILE, json.dumps(report, indent=1))
    print(f"wrote {out_dir} (model with routers) and {out_dir / METRICS_FILE}")
    return report
