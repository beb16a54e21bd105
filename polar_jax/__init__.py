"""polar-jax: Polar Sparsity (batch-invariant contextual sparsity) for LLM decoding in JAX/Pallas."""

from polar_jax.cache import KVCache, init_cache
from polar_jax.config import ModelConfig, from_hf_config, preset
from polar_jax.engine import SamplingParams
from polar_jax.generate import GenerateOutput, SamplingConfig, generate
from polar_jax.llm import LLM
from polar_jax.model import forward
from polar_jax.params import init_params
from polar_jax.sparsity import SparsityConfig


def load(path):
    """(config, params, tokenizer) of a model directory written by `polar convert`."""
    from polar_jax.checkpoint import load as _load

    return _load(path)


__all__ = ["LLM", "KVCache", "ModelConfig", "SamplingParams", "GenerateOutput", "SamplingConfig", "SparsityConfig",
           "forward", "from_hf_config", "generate", "init_cache", "init_params", "load", "preset"]
