"""The Mosaic GPU decode-attention prototype and its probe off a GPU: importing is safe, the call and the probe
say in one line why they cannot run, unsupported inputs raise NotImplementedError (so a dispatcher falls
back), the kernel's logic (pipeline over the cache, length masking, online softmax, padded query rows)
matches the f32 reference in the Mosaic GPU interpreter, and the compiled path lowers to a Mosaic GPU
custom call for cuda. Compiling and running it on a GPU is benchmarks/mosaic_probe.py's job.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.mosaic_probe import CONFIGS as PROBE_CONFIGS
from pallas_kernels.decode_attention import decode_attention_reference, mosaic
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[1]
off_gpu = pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the behaviour off a GPU")


def _inputs(key, B, N, K, S, H, dtype, layers=None):
    ks = jax.random.split(key, 3)
    lead = () if layers is None else (layers,)
    rnd = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
    return rnd(ks[0], (B, N, H)), rnd(ks[1], lead + (B, K, S, H)), rnd(ks[2], lead + (B, K, S, H))


@off_gpu
def test_compiled_call_off_gpu_raises_one_line():
    q, k, v = _inputs(jax.random.key(0), 2, 8, 2, 128, 64, jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="needs a CUDA GPU") as e:
        mosaic.decode_attention(q, k, v, jnp.array([128, 5], jnp.int32))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case, match", [
    (dict(head_idx=jnp.zeros((2, 1), jnp.int32)), "head_idx=None"),
    (dict(dtype=jnp.float32), "float16/bfloat16"),
    (dict(H=80), "H % 64"),
    (dict(S=200), "S % block_s"),
])
def test_unsupported_inputs_raise_not_implemented(case, match):
    """Raised before any device check, on every backend: the API's fallback signal."""
    q, k, v = _inputs(jax.random.key(1), 2, 8, 2, case.get("S", 128), case.get("H", 64),
                      case.get("dtype", jnp.bfloat16))
    with pytest.raises(NotImplementedError, match=match):
        mosaic.decode_attention(q, k, v, jnp.array([3, 7], jnp.int32), case.get("head_idx"),
                                config=mosaic.MosaicAttentionConfig(block_s=64))


@off_gpu
def test_probe_exits_cleanly_off_gpu(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.mosaic_probe", "--out", str(out)], cwd=ROOT, check=False,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mosaic_probe: nothing to measure here:"), r.stdout
    assert not out.exists()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the Mosaic GPU interpreter runs on CPU")
@pytest.mark.parametrize("B, N, K, S, H, dtype, lengths, block_s, steps, dynamic, layer", [
    # GQA G=4: full, ragged (not a block multiple) and empty sequences; dynamic pipeline grid
    (3, 8, 2, 256, 128, jnp.bfloat16, [256, 77, 0], 64, 2, True, None),
    # MHA G=1, H=64, three blocks in flight over one block, static grid (all S streamed and masked),
    # layer 1 of a stacked cache, lengths 1 and S - 1
    (2, 3, 3, 128, 64, jnp.float16, [1, 127], 128, 3, False, 1),
])
def test_interpreter_matches_reference(B, N, K, S, H, dtype, lengths, block_s, steps, dynamic, layer):
    q, k, v = _inputs(jax.random.key(B * 10 + N), B, N, K, S, H, dtype, layers=None if layer is None else 2)
    lens = jnp.array(lengths, jnp.int32)
    cfg = mosaic.MosaicAttentionConfig(block_s=block_s, max_concurrent_steps=steps, dynamic_grid=dynamic)
    out = mosaic.decode_attention(q, k, v, lens, layer=layer, interpret=True, config=cfg)
    assert out.shape == q.shape and out.dtype == q.dtype
    f32 = lambda x: x.astype(jnp.float32)
    ref = decode_attention_reference(f32(q), f32(k), f32(v), lens, layer=layer)
    assert_close(out, ref, dtype)
    empty = np.asarray(lens) == 0
    assert np.all(np.asarray(out, np.float32)[empty] == 0)


@pytest.mark.parametrize("B, K, S, H, dtype", [(3, 8, 1024, 128, jnp.bfloat16), (2, 16, 512, 64, jnp.float16)])
@pytest.mark.parametrize("fields", [f for _, f in PROBE_CONFIGS])
def test_lowers_to_mosaic_gpu_for_cuda(B, K, S, H, dtype, fields):
    """The compiled path (real wgmma, register layouts, scalar length load, dynamic pipeline grid) lowers
    through Pallas to a Mosaic GPU custom call for the cuda platform, here without a GPU: the probe's
    configs at its check shapes. PTX/cubin generation is left to the GPU."""
    q = jax.ShapeDtypeStruct((B, K, mosaic.ROWS, H), dtype)
    kv = jax.ShapeDtypeStruct((B, K, S, H), dtype)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    call = lambda q, k, v, n: mosaic.padded_attention(q, k, v, n, config=mosaic.MosaicAttentionConfig(**fields))
    text = jax.jit(call).trace(q, kv, kv, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
