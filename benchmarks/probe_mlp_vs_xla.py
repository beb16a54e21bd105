"""Probe: how far is each selective GEMM of bench_mlp's targets from XLA's own GEMM of the same size?

    python -m benchmarks.probe_mlp_vs_xla [--out OUT.json] [--tune]

At each target shape (D = 8192; relu with 3,328 of 32,768 neurons at B = 16 and 128; gated with 6,656 of
22,016 at B = 48) times, on the kernel clock (profiler trace, two weight sets rotated so no call reads the
previous one's from L2):
  ours        selective_up / selective_down over shuffled row ids (the gather a sparse MLP does), with this
              device's config (tuned table or heuristics), and with --tune the re-tune's winner as well;
  ours_rows   the same kernel over rows 0..count-1 in order (what the gather itself costs);
  xla         XLA's dot over the same rows copied out beforehand (a dense GEMM of the same size), with the
              Triton GEMM config XLA's autotuner chose for it, read from the compiled HLO.
Each time is also given as the weight bytes per second over the streaming-read ceiling of the same run.
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.bench_mlp import device_profile
from pallas_kernels import autotune
from pallas_kernels.selective_gemm import triton as T

CASES = (("up", "relu", 16, 8192, 3328), ("down", "relu", 16, 8192, 3328),
         ("up", "relu", 128, 8192, 3328), ("down", "relu", 128, 8192, 3328),
         ("up", "gated", 48, 8192, 6656), ("down", "gated", 48, 8192, 6656))


def _xla_gemm_configs(fn, *args) -> list[str]:
    """The GEMM configs in XLA's compiled HLO of fn (its autotuner's choice), one string per GEMM."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    found = re.findall(r'"(?:triton_gemm_config|block_level_fusion_config)":\{[^}]*\}', text)
    return found or [m for m in re.findall(r'custom_call_target="([^"]+)"', text) if "gemm" in m.lower()]


def _kernel_us(fn, arg_sets) -> float:
    kernels, _ = device_profile(fn, arg_sets, calls=10)
    return sum(kernels.values()) / 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--tune", action="store_true", help="also re-tune each shape and time the winner")
    common.add_device_args(ap)
    args = ap.parse_args(argv)
    common.require_gpu("benchmarks.probe_mlp_vs_xla", args.allow_cpu)

    ceiling, _ = common.read_bandwidth()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: read ceiling {ceiling / 1e12:.3f} TB/s")
    bf = jnp.bfloat16
    rows_out = []
    for kind, variant, B, D, n in CASES:
        gated = variant == "gated"
        F = 4 * n
        keys = jax.random.split(jax.random.key(B * 7 + n), 6)
        perm = jax.random.permutation(keys[0], F)[:n].astype(jnp.int32)
        ordered = jnp.arange(n, dtype=jnp.int32)
        n_mats = 2 if kind == "up" and gated else 1
        ws = [[(jax.random.normal(jax.random.fold_in(keys[1], 10 * s + m), (1, F, D), jnp.float32) * D ** -0.5).astype(bf)
               for m in range(n_mats)] for s in range(2)]
        if kind == "up":
            a = jax.random.normal(keys[2], (B, D), jnp.float32).astype(bf)
            shape = dict(B=B, D=D, count=n, gated=gated, dtype=bf)
            cfg = T.up_config(**shape)

            def ours(a, w, idx, cfg):
                return T.selective_up(a, w[0], idx, n, w_gate=w[1] if gated else None,
                                    activation="none" if gated else "relu", layer=0, config=cfg)

            def xla(a, wg):  # wg: the selected rows, copied out [n_mats, n, D]
                u = jnp.einsum("bd,nd->bn", a, wg[0])
                return (jax.nn.silu(jnp.einsum("bd,nd->bn", a, wg[1])) * u if gated else jax.nn.relu(u)).astype(bf)
        else:
            a = jax.random.normal(keys[2], (B, n), jnp.float32).astype(bf)
            shape = dict(B=B, D=D, count=n, dtype=bf)
            cfg = T.down_config(**shape)

            def ours(a, w, idx, cfg):
                return T.selective_down(a, w[0], idx, n, layer=0, config=cfg)

            def xla(a, wg):
                return jnp.einsum("bn,nd->bd", a, wg[0]).astype(bf)
        configs = {"config": cfg}
        if args.tune:
            configs["tuned"] = autotune.tune("selective_" + kind, shape, log=print)["best"]
        nbytes = n_mats * n * D * 2
        row = dict(kind=kind, variant=variant, B=B, D=D, count=n, weight_mb=nbytes / 1e6)
        line = [f"{kind:4s} {variant:5s} B={B:3d} D={D} count={n} ({nbytes / 1e6:5.1f} MB):"]
        for label, c in configs.items():
            for rows_name, idx in ((f"ours_{label}", perm), (f"ours_{label}_rows", ordered)):
                f = jax.jit(lambda a, w, idx=idx, c=c: ours(a, w, idx, c))
                us = _kernel_us(f, [(a, w) for w in ws])
                row[rows_name] = {"us": us, "frac": nbytes / (us * 1e-6) / ceiling, "config": str(c)}
                line.append(f"{rows_name} {us:6.1f} us {row[rows_name]['frac']:.3f}")
        wgs = [jnp.stack([jnp.take(w[m][0], perm, axis=0) for m in range(n_mats)]) for w in ws]
        us = _kernel_us(jax.jit(xla), [(a, wg) for wg in wgs])
        row["xla"] = {"us": us, "frac": nbytes / (us * 1e-6) / ceiling, "configs": _xla_gemm_configs(xla, a, wgs[0])}
        line.append(f"xla {us:6.1f} us {row['xla']['frac']:.3f}")
        print("  ".join(line))
        for label, c in configs.items():
            print(f"    {label}: {c}")
        for c in row["xla"]["configs"]:
            print(f"    xla: {c}")
        rows_out.append(row)
        del ws, wgs
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ceiling": ceiling,
                       "rows": rows_out}, fh, indent=1)


if __name__ == "__main__":
    main()
