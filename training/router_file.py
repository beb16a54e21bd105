"""Routers on their own: one small file with a model's router parameters (and its sparsity config), attachable to
another copy of the same model, e.g. one converted in bf16 on another machine.

A routed model directory (`polar train-routers`) repeats the whole model (SmolLM2-135M in fp32: 540 MB); its
routers are a few hundred KB. The router file is an .npz (no pickles) holding
  routers/attn/w [L, D, K], routers/attn/b [L, K]   (and routers/mlp/... when trained), float32
  model.json       the ModelConfig the routers were trained for
  fingerprint      embed[:4, :8] of that model, float32: tells a different checkpoint of the same shape apart
  sparsity.json    optional: the calibrated SparsityConfig (`polar calibrate`) the routers run with

    python -m training.router_file export runs/routed-k2 routers-k2.npz --sparsity runs/sparsity-k2.json
    python -m training.router_file attach routers-k2.npz models/smollm2-bf16 --out models/routed-k2 \
        --sparsity-out models/sparsity-k2.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from polar_jax.config import ModelConfig
from polar_jax.sparsity import SparsityConfig, check_routers

FINGERPRINT = (slice(0, 4), slice(0, 8))  # a corner of the embedding: present in every model, cheap to compare
# bf16 keeps 8 bits of mantissa: a value converted to bf16 and back differs from fp32 by < 2^-8 relative.
FINGERPRINT_RTOL = 1e-2


def _flat(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v, np.float32)
    return out


def _nest(flat: dict[str, np.ndarray], prefix: str) -> dict:
    out: dict = {}
    for key, v in flat.items():
        if key.startswith(prefix):
            *path, leaf = key[len(prefix):].split("/")
            d = out
            for p in path:
                d = d.setdefault(p, {})
            d[leaf] = v
    return out


def export_routers(model_dir: str | Path, out: str | Path, sparsity: str | Path | None = None) -> Path:
    """Write the routers of a model directory (and the sparsity config JSON `sparsity`) to the .npz `out`."""
    from polar_jax.checkpoint import load_params, write_whole
    from polar_jax.config import load_config

    model_dir = Path(model_dir)
    cfg = load_config(model_dir / "config.json")
    params = load_params(model_dir, cfg)
    routers = params.get("routers") or {}
    if not routers:
        raise ValueError(f"{model_dir} has no routers to export (train them with `polar train-routers`)")
    arrays = _flat(routers, "routers/")
    arrays["model.json"] = np.array(json.dumps(cfg.to_dict()))
    arrays["fingerprint"] = np.asarray(params["embed"][FINGERPRINT], np.float32)
    if sparsity is not None:
        sp = SparsityConfig.from_json(sparsity)  # refuse a broken config here, not on the other machine
        check_routers(cfg, {"routers": routers}, sp, where=str(model_dir))
        arrays["sparsity.json"] = np.array(Path(sparsity).read_text())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_whole(out, buf.getvalue())  # a reader never sees half a file
    return Path(out)


def read_routers(path: str | Path) -> tuple[ModelConfig, dict, np.ndarray, str | None]:
    """(model config, routers tree of float32 arrays, embedding fingerprint, sparsity JSON text or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"router file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
        cfg = ModelConfig.from_dict(json.loads(str(flat["model.json"])))
        fingerprint = flat["fingerprint"]
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path} is not a router file (python -m training.router_file export): {e}") from e
    sparsity = str(flat["sparsity.json"]) if "sparsity.json" in flat else None
    return cfg, _nest(flat, "routers/"), fingerprint, sparsity


def attach_routers(cfg: ModelConfig, params: dict, path: str | Path) -> tuple[dict, SparsityConfig | None]:
    """params with the routers of the file `path`, cast to the params' dtype and on the default device, and the
    file's sparsity config (None when it has none). Raises ValueError when the file was made for another model:
    another config (the differing fields named), another checkpoint (fingerprint), or routers of wrong shapes."""
    path = Path(path)
    file_cfg, routers, fingerprint, sparsity = read_routers(path)
    if file_cfg != cfg:
        a, b = file_cfg.to_dict(), cfg.to_dict()
        diff = ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b.get(k))
        raise ValueError(f"{path} holds routers for another model: {diff} (file vs model)")
    mine = np.asarray(params["embed"][FINGERPRINT], np.float32)
    if not np.allclose(mine, fingerprint, rtol=FINGERPRINT_RTOL, atol=1e-3):
        raise ValueError(f"{path} holds routers for another checkpoint of {cfg.name}: the embeddings differ "
                         f"(embed[0, :4] {fingerprint[0, :4]} in the file, {mine[0, :4]} here)")
    kinds = SparsityConfig(attn="router" if "attn" in routers else "all",
                           mlp="router" if "mlp" in routers else "all", mlp_k=1 if "mlp" in routers else None)
    check_routers(cfg, {"routers": routers}, kinds, where=str(path))
    dtype = params["embed"].dtype
    placed = jax.tree.map(lambda a: jax.device_put(np.asarray(a).astype(dtype)), routers)
    sp = None
    if sparsity is not None:
        sp = _sparsity_config(sparsity)
        check_routers(cfg, {"routers": placed}, sp, where=str(path))
    return {**params, "routers": placed}, sp


def _sparsity_config(text: str) -> SparsityConfig:
    """SparsityConfig of a sparsity JSON text, through from_json so the two never read a file differently."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "sparsity.json").write_text(text)
        return SparsityConfig.from_json(Path(d) / "sparsity.json")


def attach(path: str | Path, model_dir: str | Path, out: str | Path, sparsity_out: str | Path | None = None,
           overwrite: bool = False) -> tuple[Path, SparsityConfig | None]:
    """Save model_dir plus the routers of the file `path` as the model directory `out` (params keep model_dir's
    dtype); write the file's sparsity config to `sparsity_out` when given."""
    from polar_jax.checkpoint import load, save

    cfg, params, tok = load(Path(model_dir))
    params, sp = attach_routers(cfg, params, path)
    if sparsity_out is not None and sp is None:
        raise ValueError(f"{path} holds no sparsity config (export it with --sparsity) for --sparsity-out")
    save(out, cfg, params, tokenizer_dir=model_dir if tok is not None else None, overwrite=overwrite)
    if sparsity_out is not None:
        sp.to_json(sparsity_out, meta={"routers_from": str(path)})
    return Path(out), sp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write a routed model's routers (and sparsity config) to one .npz file")
    e.add_argument("model", help="model directory with routers (`polar train-routers`)")
    e.add_argument("out", help="the router file to write (.npz)")
    e.add_argument("--sparsity", help="the sparsity config JSON the routers run with (`polar calibrate`)")
    a = sub.add_parser("attach", help="a copy of a model directory with the routers of a router file")
    a.add_argument("file", help="router file (export)")
    a.add_argument("model", help="model directory of the same model (any dtype)")
    a.add_argument("--out", required=True, help="model directory to write")
    a.add_argument("--sparsity-out", help="also write the file's sparsity config JSON here")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it is a model directory")
    args = p.parse_args(argv)
    try:
        if args.cmd == "export":
            out = export_routers(args.model, args.out, args.sparsity)
            print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} KB)")
        else:
            out, _ = attach(args.file, args.model, args.out, args.sparsity_out, args.overwrite)
            print(f"wrote {out}" + (f" and {args.sparsity_out}" if args.sparsity_out else ""))
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
