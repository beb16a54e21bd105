"""Router training data: run the dense model over text and record, per layer and token, what routers learn.

Each shard directory holds, for its n tokens (windows of seq_len, in order):
  router_in.npy    [L, n, D] float16  attention-norm output: the input of both routers
  head_norms.npy   [L, n, N] float32  L2 norm of each query head's attention output (attention labels)
  mlp_active.npy   [L, n, ceil(F/8)] uint8  np.packbits(act > 0) over F (ReLU models only: MLP labels)
  tokens.npy       [n] int32
manifest.json names the model (name, config hash, weights fingerprint), the text (source, stream hash,
seq_len) and the complete shards. A shard is written under a temporary name, renamed, and only then
listed, so an interrupted run resumes after the last listed shard and never reads a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from polar_jax.cache import init_cache
from polar_jax.checkpoint import write_whole
from polar_jax.config import ModelConfig
from polar_jax.model import PREFILL_COMPILER_OPTIONS, forward
from training import data as data_lib

MANIFEST = "manifest.json"
FORMAT = 1
_F16_MAX = float(np.finfo(np.float16).max)


def has_mlp_labels(cfg: ModelConfig) -> bool:
    """MLP activity is a label only where the activation is exactly zero when inactive: plain ReLU MLPs."""
    return cfg.activation == "relu" and not cfg.gated_mlp


def bytes_per_token(cfg: ModelConfig, mlp: bool) -> int:
    """Disk bytes of one collected token: router input (f16), head norms (f32), MLP activity bits, token id."""
    return cfg.n_layers * (2 * cfg.dim + 4 * cfg.n_heads + (-(-cfg.mlp_dim // 8) if mlp else 0)) + 4


def _free_bytes(path: Path) -> int:
    """Free space of the file system `path` will be on (its nearest existing ancestor)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def config_hash(cfg: ModelConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_stats(params: dict) -> list[float]:
    """mean |a|, std and the mean of the first 8 rows of three tensors: within 1e-5 of the std for fp32, bf16
    and fp16 copies of one model, ~1e-2 of it apart for other weights of one architecture (random seeds)."""
    lp = params["layers"]
    stats = []
    for a in (params["embed"], lp["wqkv"][0], lp["w_up"][-1]):
        a = jnp.asarray(a, jnp.float32)
        stats += [float(jnp.mean(jnp.abs(a))), float(jnp.std(a)), float(jnp.mean(a[:8]))]
    return stats


def weights_fingerprint(stats: list[float]) -> str:
    """A short name of weights_stats for messages (and the only check of manifests written before the stats)."""
    return hashlib.sha256(" ".join(f"{s:.3e}" for s in stats).encode()).hexdigest()[:16]


def same_weights(theirs: list[float], ours: list[float]) -> bool:
    """Stats of one model in another precision: each within 1e-3 of its tensor's std."""
    if len(theirs) != len(ours):
        return False
    t, o = np.asarray(theirs, np.float64).reshape(-1, 3), np.asarray(ours, np.float64).reshape(-1, 3)
    return bool(np.all(np.abs(t - o) <= 1e-3 * o[:, 1:2]))


def model_identity(cfg: ModelConfig, params: dict) -> dict:
    stats = weights_stats(params)
    return {"model": cfg.name, "config_hash": config_hash(cfg), "weights": weights_fingerprint(stats),
            "weights_stats": stats}


def check_identity(manifest: dict, cfg: ModelConfig, params: dict, data_dir) -> None:
    """Raise ValueError when the data in data_dir was collected from a different model (fp32, bf16 and fp16
    copies of one model count as the same)."""
    ident = model_identity(cfg, params)
    if manifest.get("config_hash") != ident["config_hash"]:
        raise ValueError(f"{data_dir} holds data collected from model {manifest.get('model')!r} (config hash "
                         f"{manifest.get('config_hash')}), not from {cfg.name!r} (config hash "
                         f"{ident['config_hash']}); collect data with this model or use its data directory")
    stats = manifest.get("weights_stats")
    same = (same_weights(stats, ident["weights_stats"]) if isinstance(stats, list)
            else manifest.get("weights") == ident["weights"])
    if not same:
        raise ValueError(f"{data_dir} holds data collected from other weights of {cfg.name!r} (weights "
                         f"fingerprint {manifest.get('weights')}, this model {ident['weights']}); collect "
                         "data with this model")


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no collected data in {data_dir} (missing {MANIFEST}); run `polar collect`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt manifest {path}: {e}") from e


def make_collect_fn(cfg: ModelConfig, mlp: bool):
    """jit fn(params, tokens [B, T]) -> (router_in [L, B*T, D] f16, head_norms [L, B*T, N] f32,
    mlp_active [L, B*T, ceil(F/8)] uint8 or None)."""

    def fn(params, tokens):
        B, T = tokens.shape
        cache = init_cache(cfg, B, T, params["embed"].dtype)
        # last_only: the logits are not needed, and [B, T, V] of them would cost more than the layers.
        _, _, col = forward(cfg, params, tokens, cache, last_only=True, collect=True)
        L = cfg.n_layers
        h = jnp.clip(col.router_in.astype(jnp.float32), -_F16_MAX, _F16_MAX).astype(jnp.float16)
        norms = col.head_norms.astype(jnp.float32).reshape(L, B * T, cfg.n_heads)
        active = jnp.packbits(col.mlp_hidden > 0, axis=-1).reshape(L, B * T, -1) if mlp else None
        return h.reshape(L, B * T, cfg.dim), norms, active  # [L, n, D], [L, n, N], [L, n, F/8]

    return jax.jit(fn, compiler_options=PREFILL_COMPILER_OPTIONS)


@dataclass
class CollectResult:
    out_dir: Path
    tokens: int  # tokens on disk
    new_tokens: int  # collected by this call
    shards: int


def collect(cfg: ModelConfig, params: dict, tokens: np.ndarray, source: str, out_dir, *, n_tokens: int,
            seq_len: int = 512, batch: int = 8, shard_tokens: int = 16384, progress: bool = True) -> CollectResult:
    """Record router training data for the first n_tokens of the stream `tokens` (windows of seq_len).

    Resumes an interrupted run in out_dir (same model, text and seq_len); refuses data of another model.
    """
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (a prefill), got {seq_len}")
    if seq_len > cfg.max_positions:  # RoPE runs past it too, but the routers would learn extrapolation
        raise ValueError(f"--seq-len {seq_len} exceeds the {cfg.max_positions}-token context of {cfg.name}")
    if n_tokens < seq_len:
        raise ValueError(f"--tokens {n_tokens} is less than one window of --seq-len {seq_len}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out_dir = Path(out_dir)
    mlp = has_mlp_labels(cfg)
    wins = data_lib.windows(tokens, seq_len)  # [W, T], all the stream holds
    n_win = min(len(wins), -(-n_tokens // seq_len))
    if n_win * seq_len < n_tokens:
        print(f"note: the text holds {len(wins) * seq_len} tokens in windows of {seq_len}; collecting those")
    per_shard = max(batch, shard_tokens // seq_len // batch * batch)  # windows per shard, whole batches
    meta = {"format": FORMAT, **model_identity(cfg, params), "source": source,
            "stream_hash": data_lib.stream_hash(wins), "seq_len": seq_len, "dim": cfg.dim, "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "mlp_dim": cfg.mlp_dim, "mlp": mlp}

    manifest = {**meta, "tokens": 0, "shards": []}
    if (out_dir / MANIFEST).is_file():
        old = read_manifest(out_dir)
        check_identity(old, cfg, params, out_dir)
        for key in ("stream_hash", "seq_len"):
            if old.get(key) != meta[key]:
                raise ValueError(f"{out_dir} was collected from other text or settings ({key} {old.get(key)!r} "
                                 f"!= {meta[key]!r}); use a new --out directory")
        manifest = old
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists, is not empty and has no {MANIFEST}; use a new --out directory")
    done_win = sum(s["windows"] for s in manifest["shards"])
    todo = max(0, n_win - done_win) * seq_len
    per_token, free = bytes_per_token(cfg, mlp), _free_bytes(out_dir)
    need = todo * per_token
    print(f"collect: {todo} tokens x {per_token / 1e3:.1f} KB = {need / 1e9:.2f} GB to write to {out_dir} "
          f"({free / 1e9:.1f} GB free)")
    if need > free:
        raise ValueError(f"{out_dir}: collecting {todo} tokens needs {need / 1e9:.2f} GB ({per_token / 1e3:.1f} KB "
                         f"per token) but only {free / 1e9:.2f} GB are free; pass fewer --tokens or another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = {s["name"] for s in manifest["shards"]}
    for stale in out_dir.glob("shard_*"):  # half-written shards of an interrupted run
        if stale.name not in listed:
            shutil.rmtree(stale)

    start_tokens = manifest["tokens"]
    fn = make_collect_fn(cfg, mlp)
    bar = tqdm(total=n_win * seq_len, initial=min(done_win, n_win) * seq_len, unit="tok", desc="collect",
               disable=not progress)
    while done_win < n_win:
        chunk = wins[done_win: min(done_win + per_shard, n_win)]  # [w, T]
        parts = []
        for i in range(0, len(chunk), batch):
            b = chunk[i: i + batch]
            pad = np.concatenate([b, np.repeat(b[-1:], batch - len(b), 0)]) if len(b) < batch else b  # fixed shape
            h, norms, active = jax.device_get(fn(params, jnp.asarray(pad)))
            keep = len(b) * seq_len
            parts.append((h[:, :keep], norms[:, :keep], None if active is None else active[:, :keep]))
            bar.update(keep)
        name = f"shard_{len(manifest['shards']):05d}"
        tmp = out_dir / (name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        np.save(tmp / "router_in.npy", np.concatenate([p[0] for p in parts], axis=1))
        np.save(tmp / "head_norms.npy", np.concatenate([p[1] for p in parts], axis=1))
        if mlp:
            np.save(tmp / "mlp_active.npy", np.concatenate([p[2] for p in parts], axis=1))
        np.save(tmp / "tokens.npy", chunk.reshape(-1).astype(np.int32))
        os.replace(tmp, out_dir / name)
        done_win += len(chunk)
        manifest["shards"].append({"name": name, "windows": len(chunk), "tokens": len(chunk) * seq_len})
        manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
        write_whole(out_dir / MANIFEST, json.dumps(manifest, indent=1))  # the old manifest or the new, never half
    bar.close()
    return CollectResult(out_dir, manifest["tokens"], manifest["tokens"] - start_tokens, len(manifest["shards"]))


@dataclass
class Dataset:
    """All shards of a data directory, tokens concatenated in collection order."""

    manifest: dict
    router_in: np.ndarray  # [L, n, D] float16
    head_norms: np.ndarray  # [L, n, N] float32
    mlp_active: np.ndarray | None  # [L, n, ceil(F/8)] uint8 (packed over F), ReLU models only
    tokens: np.ndarray  # [n] int32

    @property
    def n(self) -> int:
        return self.router_in.shape[1]


def load_data(data_dir, cfg: ModelConfig | None = None, params: dict | None = None,
              max_tokens: int | None = None) -> Dataset:
    """Read a data directory; with cfg and params, first check that it was collected from that model."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if cfg is not None and params is not None:
        check_identity(manifest, cfg, params, data_dir)
    if not manifest["shards"]:
        raise ValueError(f"{data_dir} has no complete shard yet; run `polar collect` to the end")
    fields = {"router_in": [], "head_norms": [], "mlp_active": [], "tokens": []}
    total = 0
    for s in manifest["shards"]:
        d = data_dir / s["name"]
        if not d.is_dir():
            raise FileNotFoundError(f"shard {d} listed in {MANIFEST} is missing")
        for f in fields:
            if f == "mlp_active" and not manifest["mlp"]:
                continue
            fields[f].append(np.load(d / f"{f}.npy", mmap_mode="r"))
        total += s["tokens"]
        if max_tokens is not None and total >= max_tokens:
            break
    cat = {f: np.concatenate(v, axis=-1 if f == "tokens" else 1) if v else None for f, v in fields.items()}
    if max_tokens is not None:
        cat = {f: None if v is None else (v[:max_tokens] if f == "tokens" else v[:, :max_tokens])
               for f, v in cat.items()}
    return Dataset(manifest, cat["router_in"], cat["head_norms"], cat["mlp_active"], cat["tokens"])
