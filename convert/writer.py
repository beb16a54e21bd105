"""Fill our parameter pytree tensor by tensor from a source, then write OUT in one atomic step.

Peak host memory is the converted model once: every stacked [L, ...] array is allocated once in the
target dtype and each source tensor (a memory-mapped safetensors slice or one dequantised GGUF tensor)
is cast straight into its row, then dropped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
from tqdm import tqdm

from convert.names import NameMap
from polar_jax import checkpoint
from polar_jax.config import ModelConfig, check_head_dim
from polar_jax.params import param_shapes, qkv_rows


class Source(Protocol):
    """What a source format provides to the writer (convert/hf.py, convert/gguf_source.py)."""

    path: Path
    cfg: ModelConfig
    name_map: NameMap

    def tensor_names(self) -> list[str]: ...

    def read(self, name: str) -> np.ndarray: ...  # source orientation, any float dtype

    def write_tokenizer(self, dest: Path) -> None: ...


PARTS = ("q", "k", "v")  # the parts of a fused q/k/v parameter, in row order


def target_dtype(dtype: str) -> np.dtype:
    if dtype not in checkpoint.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose one of {', '.join(checkpoint.DTYPES)})")
    return np.dtype(checkpoint.DTYPES[dtype])


def _flat_shapes(tree: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out = {}
    for k, v in tree.items():
        out |= _flat_shapes(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, x in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return tree


def fill_params(cfg: ModelConfig, name_map: NameMap, names: Iterable[str], read: Callable[[str], np.ndarray],
                dtype=np.float32, progress: bool = False, desc: str = "converting") -> dict:
    """Our nested params (numpy, `dtype`) from source tensors `names`, each fetched by `read(name)`.

    Every tensor's shape (after its transform) is asserted against polar_jax.params.param_shapes;
    every parameter must be filled exactly once. Errors are ValueErrors that name the source tensor.
    """
    shapes = _flat_shapes(param_shapes(cfg))
    arrays = {p: np.empty(s, dtype) for p, s in shapes.items()}  # allocated lazily by the OS, filled below
    # Paths filled in parts (q, k, v rows of the fused wqkv / bqkv): one flag per part, else one.
    parted = {path for path, _, part in name_map.names.values() if part is not None}
    # Which rows are filled: one flag per layer for stacked paths, one flag otherwise.
    filled = {p: np.zeros((s[0] if p.startswith("layers.") else 1, len(PARTS) if p in parted else 1), bool)
              for p, s in shapes.items()}
    names = list(names)
    for name in tqdm(names, desc=desc, unit="tensor", disable=not progress):
        hit = name_map.lookup(name)
        if hit is None:
            continue
        path, layer, fn, part = hit
        if path not in shapes:
            if path == "lm_head" and cfg.tie_embeddings:
                continue  # tied: the LM head is the embedding; a stored copy is redundant
            raise ValueError(f"tensor {name!r} maps to {path!r}, which model {cfg.name} does not have "
                             f"(config: tie_embeddings={cfg.tie_embeddings}, qkv_bias={cfg.qkv_bias}, "
                             f"out_bias={cfg.out_bias}, mlp_bias={cfg.mlp_bias}, post_norm={cfg.post_norm})")
        want = shapes[path]
        if layer is not None:
            if layer >= want[0]:
                raise ValueError(f"tensor {name!r} is layer {layer} but the config has {want[0]} layers")
            want = want[1:]
        rows = slice(None) if part is None else slice(*qkv_rows(cfg, part))
        if part is not None:
            want = (rows.stop - rows.start, *want[1:])
        x = read(name)
        if fn is not None:
            x = fn(x, cfg)
        if tuple(x.shape) != tuple(want):
            raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)} (as {path}), but the config "
                             f"(dim={cfg.dim}, heads={cfg.n_heads}/{cfg.n_kv_heads}, mlp_dim={cfg.mlp_dim}, "
                             f"vocab={cfg.vocab_size}) expects {tuple(want)}")
        row, col = (0 if layer is None else layer), (0 if part is None else PARTS.index(part))
        if filled[path][row, col]:
            raise ValueError(f"tensor {name!r} fills {path} a second time (duplicate tensor in the source)")
        target = arrays[path] if layer is None else arrays[path][layer]
        target[rows] = x  # casts to the target dtype in place
        if dtype == np.float16 and x.dtype != np.float16 and not np.isfinite(target[rows]).all():
            raise ValueError(f"tensor {name!r} has values beyond float16's range (65504): convert with "
                             "--dtype bf16 or fp32")
        filled[path][row, col] = True
        del x
    for path, done in filled.items():
        if not done.all():
            row, col = np.argwhere(~done)[0]
            layer = int(row) if path.startswith("layers.") else None
            part = PARTS[col] if path in parted else None
            raise ValueError(f"missing tensor {name_map.source_name(path, layer, part)!r} (for {path}"
                             f"{'' if layer is None else f' layer {layer}'}) in the {name_map.format} source")
    return _nest(arrays)


def untie_distinct_head(source: Source) -> None:
    """A config that ties the LM head to the embedding while the source stores a different head: keep the
    stored head (source.cfg untied), as transformers does, and say so."""
    if not source.cfg.tie_embeddings:
        return
    found = {}
    for name in source.tensor_names():
        hit = source.name_map.lookup(name)
        if hit is not None and hit[0] in ("embed", "lm_head"):
            found[hit[0]] = name
    if "lm_head" not in found or "embed" not in found:
        return
    embed, head = source.read(found["embed"]), source.read(found["lm_head"])
    rows = 4096  # compared in slices: both are memory maps of up to a few GB
    if embed.shape == head.shape and all(np.array_equal(embed[i:i + rows], head[i:i + rows])
                                         for i in range(0, embed.shape[0], rows)):
        return
    warnings.warn(f"{source.path.name}: the config ties the LM head to the embedding, but {found['lm_head']!r} "
                  "holds different values: kept as an untied LM head (as transformers does)", stacklevel=3)
    source.cfg = source.cfg.replace(tie_embeddings=False)


def write_model(source: Source, out: Path, dtype: str, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert `source` into the directory `out`: params (orbax), config.json, tokenizer files.

    Everything is written into a temporary sibling of `out` that is renamed into place only when complete;
    any error or KeyboardInterrupt removes it, so a failed conversion leaves nothing behind.
    """
    np_dtype = target_dtype(dtype)
    try:
        check_head_dim(source.cfg)
    except ValueError as e:  # converting is still exact (and tested at small head sizes); say it cannot run
        warnings.warn(f"{e}: it converts, but polar cannot run it", stacklevel=2)
    untie_distinct_head(source)
    with checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
        source.write_tokenizer(tmp)  # first: a broken tokenizer fails before the long tensor loop
        params = fill_params(source.cfg, source.name_map, source.tensor_names(), source.read, np_dtype,
                             progress=progress, desc=f"converting {source.path.name}")
        checkpoint.write(tmp, source.cfg, params)
        del params
    return Path(out)
