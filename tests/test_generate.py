"""The generate loop: finished sequences stop advancing their cache; chunked decoding (the event stream)
makes exactly the tokens of one uninterrupted run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax import generate, init_params, preset
from polar_jax.generate import (Compiled, Finished, SamplingConfig, Tokens, _decode_jit, _prefill_jit, prepare,
                                stream)

CFG = preset("tiny-llama-gqa")  # 64 positions: the cache below is exactly full


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(11))


def test_finished_sequences_stop_advancing(params):
    """Sequence 0 (long prompt) is done after 2 tokens; sequence 1 runs until the cache (S = 64) is full.
    Sequence 0's cache length must stay at its last written position, not grow by one per later step."""
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(3, CFG.vocab_size, 45)), list(rng.integers(3, CFG.vocab_size, 3))]
    max_new = [2, 61]
    tokens, lens, each, M, S = prepare(CFG, prompts, max_new, None)
    assert S == 64 and lens[1] + each[1] == S
    static = dict(cfg=CFG, sampling=SamplingConfig(), stop=())
    s = _prefill_jit(params, jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(each), jax.random.key(0),
                     max_new=M, max_len=S, **static)
    s = _decode_jit(params, s, jnp.asarray(each), jnp.int32(M), sparsity=None, **static)
    # Every token but the last was fed back into the cache.
    np.testing.assert_array_equal(np.asarray(s.cache.lengths), [45 + 2 - 1, 3 + 61 - 1])
    assert int(s.step) == 61 and np.asarray(s.n_gen).tolist() == [2, 61]

    out = generate(CFG, params, prompts, max_new_tokens=max_new, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, np.asarray(s.out))
    assert np.all(out.tokens[0, 2:] == CFG.pad_token_id)
    # The sequence that fills the cache makes what it makes alone, finished neighbour or not.
    alone = generate(CFG, params, prompts[1:], max_new_tokens=61, stop_tokens=(), max_len=S)
    np.testing.assert_array_equal(out.tokens[1], alone.tokens[0])


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_chunked_stream_equals_one_run(params, chunk):
    rng = np.random.default_rng(chunk)
    prompts = [list(rng.integers(3, CFG.vocab_size, n)) for n in (5, 17, 2)]
    hot = SamplingConfig(temperature=0.8, top_k=20)
    whole = generate(CFG, params, prompts, max_new_tokens=[9, 4, 12], sampling=hot, seed=5, stop_tokens=())
    events = list(stream(CFG, params, prompts, max_new_tokens=[9, 4, 12], sampling=hot, seed=5, stop_tokens=(),
                         chunk_steps=chunk))
    assert isinstance(events[0], Compiled) and isinstance(events[-1], Finished)
    toks = events[1:-1]
    assert all(isinstance(e, Tokens) for e in toks) and toks[0].phase == "prefill"
    assert len(toks) == 1 + -(-11 // chunk)  # prefill, then one event per chunk of the 11 decode steps
    got = [sum((e.new[b] for e in toks), []) for b in range(3)]
    for b in range(3):
        assert got[b] == list(whole.tokens[b, : whole.lengths[b]])
    assert toks[-1].finished == [True, True, True] and toks[-1].steps == 11
    out = events[-1].output
    np.testing.assert_array_equal(out.tokens, whole.tokens)
    assert out.steps == 11 and out.prompt_tokens == 24 and out.run_s == pytest.approx(out.prefill_s + out.decode_s)
