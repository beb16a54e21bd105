"""One tolerance table for the whole suite: relative error ||out - ref|| / ||ref|| against an f32 reference."""

import numpy as np

# Inputs of each dtype, fp32 accumulation; the reference is computed in float32 (or float64) from the
# same (rounded) inputs.
REL_TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 4e-3}


def rel_error(out, ref, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor): floor is the norm a typical output of these inputs would have,
    for outputs that cancel to almost nothing (a relu leaving one sum near 0) whose rounding error does not."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(out)), "output holds NaN/inf (unwritten or poisoned elements?)"
    denom = max(np.linalg.norm(ref), floor)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def assert_close(out, ref, dtype, floor: float = 0.0) -> None:
    name = np.dtype(dtype).name if not hasattr(dtype, "dtype") else np.dtype(dtype.dtype).name
    err = rel_error(out, ref, floor)
    assert err <= REL_TOL[name], f"relative error {err:.3e} > {REL_TOL[name]:.1e} for {name}"
