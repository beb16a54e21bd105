"""Where the decode path gets its sparsity: per layer, which KV heads (groups) and which MLP neurons.

Sparsity enters the model at exactly two call sites, attention and MLP, through `attention_heads` and
`mlp_neurons` below. Dense is "everything selected": the same kernels run with all heads / neurons.
Prefill is always dense; layers in `dense_layers` (layer 0 by default) are always dense.

Sources:
  all     every head / neuron (the dense model)
  oracle  heads: top-k KV groups by the L2 norm of their attention output (computed densely first);
          neurons: the union over the batch of truly active neurons (act > 0; ReLU models)
  random  heads: k KV groups drawn per sequence; neurons: k drawn for the batch
  router  learned routers in params["routers"] (training/): heads = top-k router logits per sequence;
          neurons = union over the batch of each token's top-k router logits
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from polar_jax.checkpoint import write_whole
from polar_jax.config import ModelConfig

SOURCES = ("all", "oracle", "random", "router")


def _numbers(v, kinds: tuple[type, ...]) -> bool:
    """v is a number of `kinds` or a list of them. numpy alone would take "0.5" for 0.5 and True for 1 (bool is an
    int subclass), so a quoted density or a stray boolean in a config file would run as that number."""
    return all(isinstance(x, kinds) and not isinstance(x, bool) for x in (v if isinstance(v, (tuple, list)) else [v]))


def _check_whole_neurons(name: str, ks) -> None:
    k = np.atleast_1d(np.asarray(ks))
    if k.dtype.kind not in "iu" or not _numbers(ks, (int, np.integer)) or np.any(k < 1):
        raise ValueError(f"{name} must be whole neurons, >= 1 per layer, got {ks!r}")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    attn: str = "all"
    attn_density: float | tuple[float, ...] = 1.0  # fraction of KV heads kept, per layer or one for all
    mlp: str = "all"
    mlp_k: int | tuple[int, ...] | None = None  # neurons per layer (random: union size; router: per token)
    dense_layers: tuple[int, ...] = (0,)
    seed: int = 0
    # Per-batch-size router top-k from `polar calibrate`: ((batch, per-layer k), ...) ascending in batch. Each
    # k reaches the recall target at its batch size; k need not move one way with the batch (a larger batch's
    # union can reach it with a smaller per-token k), so `for_batch` takes the larger of the two entries
    # around an uncalibrated size. A tuple of tuples, not a dict, so the config stays hashable (a static jit
    # arg).
    mlp_k_table: tuple[tuple[int, tuple[int, ...]], ...] | None = None

    def __post_init__(self):
        for field in ("attn", "mlp"):
            if getattr(self, field) not in SOURCES:
                raise ValueError(f"sparsity {field}={getattr(self, field)!r}; choose one of {SOURCES}")
        if not _numbers(self.attn_density, (int, float, np.integer, np.floating)):
            raise ValueError(f"attn_density must be a number or a list of them, got {self.attn_density!r}")
        dens = np.atleast_1d(np.asarray(self.attn_density, dtype=np.float64))
        if not np.all((dens > 0) & (dens <= 1)):  # NaN too
            raise ValueError(f"attention density must lie in (0, 1], got {self.attn_density}")
        if self.mlp_k_table is not None:
            for b, ks in self.mlp_k_table:
                _check_whole_neurons(f"mlp_k_table[{b}]", ks)
            table = tuple((int(b), tuple(int(k) for k in np.atleast_1d(ks))) for b, ks in self.mlp_k_table)
            batches = [b for b, _ in table]
            if not table or batches != sorted(set(batches)) or batches[0] < 1:
                raise ValueError(f"mlp_k_table batch sizes must be distinct, ascending and >= 1, got {batches}")
            object.__setattr__(self, "mlp_k_table", table)
        if self.mlp in ("random", "router") and self.mlp_k is None and self.mlp_k_table is None:
            raise ValueError(f"mlp={self.mlp!r} needs mlp_k (neurons per layer) or mlp_k_table")
        if self.mlp_k is not None:
            _check_whole_neurons("mlp_k", self.mlp_k)
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"sparsity seed must be an integer, got {self.seed!r}")
        if not isinstance(self.dense_layers, (tuple, list)) or not all(
                isinstance(l, (int, np.integer)) and not isinstance(l, bool) for l in self.dense_layers):
            raise ValueError(f"dense_layers must be a list of layer indices, got {self.dense_layers!r}")
        # Settings a source of "all" would silently ignore (the run stays dense where the user asked otherwise)
        if self.attn == "all" and np.any(dens < 1):
            raise ValueError(f"attn_density {self.attn_density} needs attn = router, oracle or random (with attn "
                             "'all' every head runs)")
        if self.mlp_k is not None and self.mlp_k_table is not None:
            raise ValueError("pass either mlp_k or mlp_k_table, not both (the table's k would replace mlp_k)")
        if self.mlp == "all" and (self.mlp_k is not None or self.mlp_k_table is not None):
            raise ValueError("mlp_k / mlp_k_table need mlp = router or random (with mlp 'all' every neuron runs)")

    def check_layers(self, cfg: ModelConfig) -> None:
        """ValueError unless the per-layer fields fit cfg's layer count (dense_layers in [0, L), per-layer
        lists of length L) and the MLP source fits its activation."""
        L = cfg.n_layers
        if self.mlp == "oracle" and cfg.gated_mlp:
            raise ValueError(f"mlp 'oracle' keeps the neurons whose activation is not zero: {cfg.name}'s gated "
                             f"{cfg.activation} MLP has none that are, so it would run dense (ReLU models only)")
        bad = [l for l in self.dense_layers if not 0 <= l < L]
        if bad:
            raise ValueError(f"sparsity dense_layers {list(self.dense_layers)}: layer {bad[0]} is not one of "
                             f"{cfg.name}'s layers 0..{L - 1}")
        lists = [("attn_density", self.attn_density), ("mlp_k", self.mlp_k)]
        lists += [(f"mlp_k_table[{b}]", ks) for b, ks in self.mlp_k_table or ()]
        for name, v in lists:
            n = np.size(v) if v is not None else 1
            if n != 1 and n != L:
                raise ValueError(f"sparsity {name} has {n} per-layer values; {cfg.name} has {L} layers")
            if name != "attn_density" and v is not None and np.max(v) > cfg.mlp_dim:
                raise ValueError(f"sparsity {name} keeps up to {int(np.max(v))} neurons a layer; {cfg.name}'s MLP "
                                 f"has {cfg.mlp_dim} (a config made for another model?)")

    def for_batch(self, batch: int) -> SparsityConfig:
        """This config with mlp_k taken from mlp_k_table for a batch of `batch` real sequences.

        A calibrated batch size takes its own entry; a size between two takes, layer by layer, the larger k
        of the two around it; a size past either end takes the nearest entry. Without a table: self.
        """
        if self.mlp_k_table is None:
            return self
        below = [ks for b, ks in self.mlp_k_table if b <= batch]
        above = [ks for b, ks in self.mlp_k_table if b >= batch]
        lo, hi = (below or above)[-1 if below else 0], (above or below)[0 if above else -1]
        ks = tuple(int(k) for k in np.maximum(np.asarray(lo), np.asarray(hi)))
        return dataclasses.replace(self, mlp_k=ks if len(ks) > 1 else ks[0], mlp_k_table=None)

    def neuron_count_table(self, cfg: ModelConfig, max_batch: int) -> np.ndarray:
        """[max_batch + 1, L] neurons per layer for 1 .. max_batch real sequences (row 0 as row 1): a decode
        step picks its row on the device, by how many of its padded rows are real."""
        rows = [self.for_batch(max(b, 1)).neuron_counts(cfg) for b in range(max_batch + 1)]
        return np.stack(rows).astype(np.int32)

    def head_counts(self, cfg: ModelConfig) -> np.ndarray:
        """[L] KV heads (groups) kept per layer, at least 1; all of them in dense layers."""
        dens = np.broadcast_to(np.asarray(self.attn_density, dtype=np.float64), (cfg.n_layers,))
        counts = np.clip(np.floor(dens * cfg.n_kv_heads + 0.5), 1, cfg.n_kv_heads).astype(np.int32)  # half up
        if self.attn == "all":
            counts[:] = cfg.n_kv_heads
        counts[list(self.dense_layers)] = cfg.n_kv_heads
        return counts

    def neuron_counts(self, cfg: ModelConfig, batch: int | None = None) -> np.ndarray:
        """[L] neurons per layer (random: union size; router: top-k per token); F in dense layers.

        With an mlp_k_table: the counts for `batch` real sequences (see `for_batch`); without a batch, the
        largest count of each layer over the table's entries.
        """
        if self.mlp in ("all", "oracle"):
            return np.full(cfg.n_layers, cfg.mlp_dim, np.int32)
        if self.mlp_k_table is not None:
            if batch is None:
                return np.max([self.for_batch(b).neuron_counts(cfg) for b, _ in self.mlp_k_table], axis=0)
            return self.for_batch(batch).neuron_counts(cfg)
        k = np.broadcast_to(np.asarray(self.mlp_k, dtype=np.int64), (cfg.n_layers,))
        counts = np.clip(k, 1, cfg.mlp_dim).astype(np.int32)
        counts[list(self.dense_layers)] = cfg.mlp_dim
        return counts

    def to_json(self, path: str | Path, meta: dict | None = None) -> None:
        """Write the config; mlp_k_table as {"batch": [k per layer]}. `meta` (how it was made) is stored
        under "meta" and ignored when reading."""
        d = dataclasses.asdict(self)
        if self.mlp_k_table is not None:
            d["mlp_k_table"] = {str(b): list(ks) for b, ks in self.mlp_k_table}
        if meta:
            d["meta"] = meta
        write_whole(path, json.dumps(d, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> SparsityConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sparsity config not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"sparsity config {path} is not valid JSON: {e.msg} at line {e.lineno} column "
                             f"{e.colno}") from None
        if not isinstance(d, dict):
            raise ValueError(f"sparsity config {path} must hold a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"meta"})
        if unknown:  # a misspelt key would otherwise leave its field at the default (dense) without a word
            raise ValueError(f"sparsity config {path}: unknown key {unknown[0]!r}; the keys are {sorted(known)}")
        for key in ("attn_density", "mlp_k", "dense_layers"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        try:
            if isinstance(d.get("mlp_k_table"), dict):
                d["mlp_k_table"] = tuple(sorted((int(b), tuple(ks)) for b, ks in d["mlp_k_table"].items()))
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, ValueError) as e:  # wrong values in valid JSON
            raise ValueError(f"bad sparsity config {path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of consecutive layers that share capacities, so one `lax.scan` body serves them.

    head_capacity / neuron_capacity: the static number of selection slots the kernels are sized for;
    None means the layer is dense there (every head / neuron, no selection at all).
    """

    start: int
    stop: int
    head_capacity: int | None
    neuron_capacity: int | None


def plan(sp: SparsityConfig, cfg: ModelConfig, batch: int, per_row_heads: bool = False,
         count_table: np.ndarray | None = None) -> list[Segment]:
    """Split the layers into segments of equal capacities (typically: dense layer 0, then the rest).

    Sparse layers share the largest count among them as capacity, so the kernels' grids follow the work
    (a dense layer in the same scan would force the capacity of every layer up to all heads / neurons).
    per_row_heads: each sequence may ask for its own head count (up to all K), so sparse layers get
    capacity K; slots past a row's count are empty and cost an early exit.
    count_table: [batch + 1, L] a calibrated table's neuron counts by real rows (SparsityConfig.
    neuron_count_table), sp's mlp_k their largest: a layer selects neurons where any row count keeps fewer than F.
    """
    K, F = cfg.n_kv_heads, cfg.mlp_dim
    heads, neurons = sp.head_counts(cfg), sp.neuron_counts(cfg, batch)
    fewest = neurons if count_table is None else np.min(count_table, axis=0)
    dense = np.zeros(cfg.n_layers, bool)
    dense[list(sp.dense_layers)] = True
    sparse_heads = ~dense & (sp.attn != "all") & ((heads < K) | per_row_heads)
    head_cap = [(K if per_row_heads else int(heads[sparse_heads].max())) if s else None for s in sparse_heads]
    sparse_mlp = ~dense & (sp.mlp != "all") & ((fewest < F) | (sp.mlp == "oracle"))
    if sp.mlp == "router":  # the union of each token's top-k over the batch
        cap = int(min(F, batch * neurons[sparse_mlp].max())) if sparse_mlp.any() else None
    elif sp.mlp == "random":
        cap = int(neurons[sparse_mlp].max()) if sparse_mlp.any() else None
    else:
        cap = F
    neuron_cap = [cap if s else None for s in sparse_mlp]
    segments: list[Segment] = []
    for layer in range(cfg.n_layers):
        caps = (head_cap[layer], neuron_cap[layer])
        if segments and (segments[-1].head_capacity, segments[-1].neuron_capacity) == caps:
            segments[-1] = dataclasses.replace(segments[-1], stop=layer + 1)
        else:
            segments.append(Segment(layer, layer + 1, *caps))
    return segments


def check_routers(cfg: ModelConfig, params: dict, sp: SparsityConfig, where: str = "the model") -> None:
    """Raise ValueError when `sp` does not fit cfg's layers, or asks for a learned router that params lacks or
    that does not fit cfg."""
    sp.check_layers(cfg)
    L, D, K, F = cfg.n_layers, cfg.dim, cfg.n_kv_heads, cfg.mlp_dim
    routers = params.get("routers") or {}
    need = []
    if sp.attn == "router":
        need.append(("attn", {"w": (L, D, K), "b": (L, K)}))
    if sp.mlp == "router":
        r = routers.get("mlp", {}).get("w1")
        R = None if r is None else r.shape[-1]  # the router's own hidden width; a missing w1 is named below
        need.append(("mlp", {"w1": (L, D, R), "b1": (L, R), "w2": (L, R, F), "b2": (L, F)}))
    sparse_layers = [l for l in range(L) if l not in sp.dense_layers]
    for kind, shapes in need:
        if kind not in routers:
            raise ValueError(f"{where} has no {kind} router, but the sparsity config asks for {kind}=router on "
                             f"layers {sparse_layers[:3]}{'...' if len(sparse_layers) > 3 else ''}; train one with "
                             f"`polar train-routers`{' --mlp' if kind == 'mlp' else ''}")
        for name, shape in shapes.items():
            got = routers[kind].get(name)
            if got is None:
                raise ValueError(f"{where}: {kind} router has no {name!r}")
            if tuple(got.shape) != shape:
                if got.shape[:1] != shape[:1]:
                    raise ValueError(f"{where}: the {kind} router covers {got.shape[0]} layers but {cfg.name} "
                                     f"has {L}; layers {list(range(got.shape[0], L))[:8]} have no router")
                raise ValueError(f"{where}: {kind} router {name!r} has shape {tuple(got.shape)}, {cfg.name} needs "
                                 f"{shape}")


def _top_slots(scores: jax.Array, count: jax.Array, capacity: int) -> jax.Array:
    """Ids of the `count` largest scores per row, padded with -1 to `capacity`: [B, X] -> [B, C].

    Ranks by pairwise comparison ([B, X, X], X = heads <= a few hundred), ties broken by id: a couple of
    fused elementwise kernels instead of a sort, which costs tens of microseconds per layer on a GPU.
    """
    X = scores.shape[-1]
    ids = jnp.arange(X)
    beats = (scores[:, None, :] > scores[:, :, None]) | (
        (scores[:, None, :] == scores[:, :, None]) & (ids[None, :] < ids[:, None]))  # [B, X(i), X(j)]
    rank = jnp.sum(beats, axis=-1)  # [B, X]: a permutation of 0..X-1
    slots = jnp.arange(capacity)
    top = jnp.argmax(rank[:, None, :] == slots[None, :, None], axis=-1)  # [B, C]: the id ranked c
    return jnp.where(slots[None, :] < count, top, -1).astype(jnp.int32)


def row_head_counts(cfg: ModelConfig, count, row_density: jax.Array | None) -> jax.Array:
    """[B, 1] heads kept per sequence: the layer's count, or row_density * K rounded half up into [1, K] (as
    SparsityConfig.head_counts) where a row asks for its own density (NaN: the layer's count)."""
    if row_density is None:
        return jnp.reshape(count, (1, 1))
    K = cfg.n_kv_heads
    own = jnp.clip(jnp.floor(row_density * K + 0.5), 1, K).astype(jnp.int32)
    return jnp.where(jnp.isnan(row_density), count, own)[:, None]


def attention_heads(sp: SparsityConfig, cfg: ModelConfig, layer, count, capacity: int | None, h: jax.Array,
                    routers: dict | None, key: jax.Array, dense_norms=None,
                    row_density: jax.Array | None = None) -> jax.Array | None:
    """Head (KV-group) ids [B, capacity] for one decode step of one layer, -1 padded; None means all heads.

    h [B, D] is the router input (the attention-norm output). dense_norms() computes [B, K] output norms
    for the oracle (only called for it). row_density [B] (optional): per-sequence densities overriding the
    layer's count (see row_head_counts); the capacity must then be K.
    """
    if capacity is None:
        return None
    count = row_head_counts(cfg, count, row_density)
    if sp.attn == "random":
        scores = jax.random.uniform(jax.random.fold_in(key, layer), (h.shape[0], cfg.n_kv_heads))
    elif sp.attn == "oracle":
        scores = dense_norms()
    else:
        r = routers["attn"]
        scores = jnp.einsum("bd,dk->bk", h, r["w"][layer], preferred_element_type=jnp.float32) + r["b"][layer]
    return _top_slots(scores, count, capacity)


def mlp_neurons(sp: SparsityConfig, cfg: ModelConfig, layer, count, capacity: int | None, h: jax.Array,
                routers: dict | None, key: jax.Array, dense_hidden=None,
                valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array] | None:
    """(idx [capacity], n) neuron union over the batch for one layer; None means dense.

    h [B, D] is the router input; dense_hidden() computes the dense activations [B, F] (oracle only).
    valid [B] bool: the rows that take part in the union (padded batch rows do not); default all.
    """
    F = cfg.mlp_dim
    if capacity is None:
        return None
    rows = jnp.ones((h.shape[0],), bool) if valid is None else valid  # [B]
    if sp.mlp == "random":
        idx = jax.random.permutation(jax.random.fold_in(key, layer), F)[:capacity]
        return idx.astype(jnp.int32), count
    if sp.mlp == "oracle":
        union = jnp.any((dense_hidden() != 0) & rows[:, None], axis=0)  # [F]
    else:
        r = routers["mlp"]
        z = jnp.einsum("bd,dr->br", h, r["w1"][layer], preferred_element_type=jnp.float32) + r["b1"][layer]
        logits = jnp.einsum("br,rf->bf", z.astype(h.dtype), r["w2"][layer],
                            preferred_element_type=jnp.float32) + r["b2"][layer]  # [B, F]
        kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), (F - count)[None, None], axis=-1)  # [B, 1]
        union = jnp.any((logits >= kth) & rows[:, None], axis=0)  # [F]
    n = jnp.minimum(jnp.sum(union), capacity).astype(jnp.int32)  # the union never exceeds capacity
    idx = jnp.nonzero(union, size=capacity, fill_value=0)[0].astype(jnp.int32)  # ascending
    return idx, n
