"""The serving engine end to end on a tiny random model (CPU): the same tokens as the static batch path
under staggered arrivals, chunked prefill and preemption; per-request sampling; logprobs; bad requests."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax import LLM, SamplingParams, SparsityConfig, generate, init_params, preset
from polar_jax.engine.llm_engine import LLMEngine
from tests.reference import dense_logits

CFG = preset("tiny-llama-gqa").replace(max_positions=128)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), jnp.float32)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in (5, 17, 33, 9, 40, 2, 23)]


def engine(params, **kw):
    kw = {"max_num_seqs": 4, "prefill_chunk": 16, "page_size": 8, "num_pages": 40, "progress": False} | kw
    return LLMEngine(CFG, params, None, **kw)


def run_staggered(eng, prompts, sp, arrive_every=2, sparsity_check=None):
    """Add prompt i at step i * arrive_every (with sp, or sp[i] for a list); run to the end; {request id:
    output}; check pages every step."""
    done, step, preempted = {}, 0, 0
    while len(done) < len(prompts):
        if step % arrive_every == 0 and step // arrive_every < len(prompts):
            i = step // arrive_every
            eng.add_request(f"r{i}", prompts[i], sp[i] if isinstance(sp, list) else sp)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
                preempted += out.num_preemptions
        eng.scheduler.check_invariants()
        step += 1
        assert step < 2000, "engine did not finish"
    bm = eng.scheduler.block_manager
    assert bm.num_free_pages == bm.num_usable_pages, "pages leaked"
    return done, preempted


def static_tokens(params, prompts, n, sparsity=None):
    ref = generate(CFG, params, prompts, max_new_tokens=n, stop_tokens=(), sparsity=sparsity)
    return [ref.tokens[i, : ref.lengths[i]].tolist() for i in range(len(prompts))]


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_greedy_equals_static_path_with_chunks_and_staggered_arrivals(params, prompts, batch_invariant):
    eng = engine(params, batch_invariant=batch_invariant)
    eng.runner.record = True
    done, preempted = run_staggered(eng, prompts, GREEDY)
    want = static_tokens(params, prompts, GREEDY.max_tokens)
    for i in range(len(prompts)):
        assert done[f"r{i}"].token_ids == want[i], f"request {i}"
        assert done[f"r{i}"].finish_reason == "length"
    assert preempted == 0
    # Steps that decoded and prefilled at once ran the mixed program (decode rows riding the prefill).
    assert sum(1 for r in eng.runner.log if r.decode_rows and r.prefill_tokens) >= 3


def test_preemption_keeps_greedy_outputs_and_frees_pages(params, prompts):
    # 12 usable pages of 8: the 4 running sequences need up to 7 each, so decode runs out and preempts.
    done, preempted = run_staggered(engine(params, num_pages=13, max_model_len=96), prompts, GREEDY, arrive_every=1)
    assert preempted > 0, "the pool was meant to force preemption"
    want = static_tokens(params, prompts, GREEDY.max_tokens)
    for i in range(len(prompts)):
        assert done[f"r{i}"].token_ids == want[i], f"request {i}"


def test_sparse_decode_in_engine_equals_static_sparse(params, prompts):
    """Oracle head selection is deterministic, so the engine's sparse decode must match the static path's;
    and it must differ from dense (the selection is really applied)."""
    sp = SparsityConfig(attn="oracle", attn_density=0.5)
    eng = engine(params, sparsity=sp)
    done, _ = run_staggered(eng, prompts, GREEDY)
    want = static_tokens(params, prompts, GREEDY.max_tokens, sparsity=sp)
    dense = static_tokens(params, prompts, GREEDY.max_tokens)
    for i in range(len(prompts)):
        assert done[f"r{i}"].token_ids == want[i], f"request {i}"
    assert any(done[f"r{i}"].token_ids != dense[i] for i in range(len(prompts)))


def test_llm_generate_in_order_and_stream_matches(params, prompts):
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    want = static_tokens(params, prompts, GREEDY.max_tokens)
    assert [o.token_ids for o in outs] == want
    streamed: dict[str, list[int]] = {}
    for out in llm.stream(prompts[:3], GREEDY):
        streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert sorted(map(tuple, streamed.values())) == sorted(map(tuple, want[:3]))
    # Token ids as arrays: [T] is one prompt, [N, T] N prompts, and a list may hold arrays.
    assert llm.generate(np.asarray(prompts[0]), GREEDY, use_tqdm=False)[0].token_ids == want[0]
    twice = np.asarray([prompts[0], prompts[0]])
    assert [o.token_ids for o in llm.generate(twice, GREEDY, use_tqdm=False)] == [want[0], want[0]]
    mixed = [np.asarray(prompts[1]), prompts[2]]
    assert [o.token_ids for o in llm.generate(mixed, GREEDY, use_tqdm=False)] == want[1:3]


class CharTokenizer:
    """Token t is the character chr(48 + t); the EOS is special (no text unless skip_special_tokens False)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if t in CFG.eos_token_ids and skip_special_tokens else chr(48 + t) for t in ids)


def test_stop_token_text_is_dropped_unless_include_stop_str_in_output(params, prompts):
    """A stop token id or EOS that ends a request stays in token_ids; its text was kept in the text too, and
    (as vLLM's) is not unless include_stop_str_in_output; stop_reason names the stop token, None for the EOS.
    Streamed deltas never carry it and add up to the text."""
    llm = LLM((CFG, params, CharTokenizer()), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40,
              progress=False)
    free = llm.generate(prompts[0], GREEDY, use_tqdm=False)[0].token_ids
    j = max(i for i in range(len(free) - 1) if free[i] not in free[:i] and free[i] not in CFG.eos_token_ids)
    assert j > 0
    eos = CFG.eos_token_ids[0]
    stop = dict(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[free[j]])
    on_eos = dict(temperature=0, max_tokens=12, logit_bias={eos: 100.0}, skip_special_tokens=False)
    sps = [SamplingParams(**kw, include_stop_str_in_output=keep) for kw in (stop, on_eos) for keep in (False, True)]
    text = "".join(chr(48 + t) for t in free[:j + 1])
    want = [(free[:j + 1], text[:-1]), (free[:j + 1], text), ([eos], ""), ([eos], chr(48 + eos))]
    outs = llm.generate([prompts[0]] * 4, sps, use_tqdm=False)
    assert [(o.token_ids, o.text, o.finish_reason) for o in outs] == [(*w, "stop") for w in want]
    assert [o.stop_reason for o in outs] == [free[j], free[j], None, None]  # vLLM's: the stop token, None at EOS
    streamed = {}
    for out in llm.stream([prompts[0]] * 4, sps):
        streamed[out.request_id] = streamed.get(out.request_id, "") + out.new_text
        assert out.text == streamed[out.request_id]
    assert [streamed[r] for r in sorted(streamed, key=lambda r: int(r.split("-")[1]))] == [t for _, t in want]


def test_outputs_read_after_the_run_say_what_they_said_at_their_step(params, prompts):
    """RequestOutput copies token_ids, logprobs and top_logprobs when they are read: outputs kept and read after
    the run must each still hold their own step's tokens, one more than the output before, the new one last;
    also for a request cut by a stop string, which drops the token the step already in flight sampled (its
    stop_reason: the string)."""
    llm = LLM((CFG, params, CharTokenizer()), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40,
              progress=False)
    free = llm.generate(prompts[0], GREEDY, use_tqdm=False)[0].token_ids
    j = max(i for i in range(len(free) - 1) if free[i] not in free[:i] and free[i] not in CFG.eos_token_ids)
    assert j > 0
    sps = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, stop=[chr(48 + free[j])])]
    kept: dict[str, list] = {}
    for out in llm.stream([prompts[0]] * 2, sps):
        kept.setdefault(out.request_id, []).append(out)
    finals = [outs[-1] for _, outs in sorted(kept.items(), key=lambda kv: int(kv[0].split("-")[1]))]
    assert [f.token_ids for f in finals] == [free, free[:j + 1]]
    assert [(f.finish_reason, f.stop_reason) for f in finals] == [("length", None), ("stop", chr(48 + free[j]))]
    assert all(out.stop_reason is None for outs in kept.values() for out in outs[:-1])
    for outs in kept.values():
        final = outs[-1]
        for k, out in enumerate(outs, 1):
            assert out.token_ids == final.token_ids[:k] and out.new_token_ids == [final.token_ids[k - 1]]
            assert out.logprobs == final.logprobs[:k] and out.top_logprobs == final.top_logprobs[:k]
            assert len(out.top_logprobs[-1]) == 2


def test_streams_used_side_by_side_each_get_all_their_outputs(params, prompts, monkeypatch):
    # One stream's engine steps make the other's outputs too: they must reach that stream, not be dropped
    # (a stream whose last output another consumed waited forever on an idle engine).
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False)
    short, long = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 9))
    want = static_tokens(params, prompts[:2], 9)
    steps, step = [0], llm.engine.step

    def counted():
        steps[0] += 1
        assert steps[0] < 200, "a stream never ended"
        return step()

    monkeypatch.setattr(llm.engine, "step", counted)
    streams = {0: llm.stream(prompts[1], long), 1: llm.stream(prompts[0], short)}
    got = {0: [], 1: []}
    while streams:  # one output from each in turn, as zip() or two consumers would take them
        for i, s in list(streams.items()):
            out = next(s, None)
            if out is None:
                del streams[i]
            else:
                got[i] += out.new_token_ids
    assert got == {0: want[1], 1: want[0][:4]}
    s = llm.stream(prompts[0], short)
    llm.engine.abort_request(next(s).request_id)  # behind the stream's back: an error, not a wait forever
    with pytest.raises(RuntimeError, match="nothing left to run"):
        next(s)


def test_per_request_sampling_differs_within_a_batch_and_reproduces(params, prompts):
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False)
    p = prompts[1]
    hot = [SamplingParams(temperature=1.5, seed=s, max_tokens=10, ignore_eos=True) for s in (1, 2)]
    mixed = [GREEDY, hot[0], hot[1], SamplingParams(temperature=1.0, top_k=3, seed=7, max_tokens=10,
                                                     ignore_eos=True)]
    outs = llm.generate([p] * 4, mixed, use_tqdm=False)
    greedy = static_tokens(params, [p], GREEDY.max_tokens)[0]
    assert outs[0].token_ids == greedy
    assert outs[1].token_ids != outs[2].token_ids, "two seeds gave the same sample"
    assert outs[1].token_ids != greedy[:10]
    # The same seeded request alone (another batch) reproduces its tokens.
    alone = llm.generate([p], hot[1], use_tqdm=False)[0]
    assert alone.token_ids == outs[2].token_ids
    # top_k = 3: every sampled token is among the 3 most likely at its position.
    seq = p + outs[3].token_ids
    logits = dense_logits(CFG, params, seq, width=128)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for j, tok in enumerate(outs[3].token_ids):
        assert tok in top3[len(p) - 1 + j], f"token {j} outside the top 3"


def test_top_k_past_the_vocabulary_and_any_int_seed_sample_like_their_in_range_equals(params, prompts):
    # A top_k past int32 once overflowed the step's array and failed every request in it; seeds are taken
    # mod 2**32, so -1 and 2**32 - 1 are one seed.
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False)
    hot = dict(temperature=1.5, max_tokens=10, ignore_eos=True)
    sps = [SamplingParams(seed=5, **hot), SamplingParams(top_k=2**40, seed=5, **hot),
           SamplingParams(top_k=CFG.vocab_size, seed=5, **hot), SamplingParams(seed=-1, **hot)]
    outs = llm.generate([prompts[1]] * 4, sps, use_tqdm=False)
    assert outs[1].token_ids == outs[0].token_ids and outs[2].token_ids == outs[0].token_ids
    alone = llm.generate([prompts[1]], SamplingParams(seed=2**32 - 1, **hot), use_tqdm=False)[0]
    assert alone.token_ids == outs[3].token_ids and alone.token_ids != outs[0].token_ids


@jax.default_matmul_precision("highest")  # on a GPU the fp32 default is TF32; the comparison is fp32
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_logprobs_equal_the_models_log_softmax(params, prompts, batch_invariant):
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False,
              batch_invariant=batch_invariant)
    p = prompts[4]  # 40 tokens: prompt logprobs span three chunks
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=4, logprobs=True, prompt_logprobs=True,
                                           ignore_eos=True), use_tqdm=False)[0]
    seq = p + out.token_ids
    logp = np.asarray(jax.nn.log_softmax(dense_logits(CFG, params, seq, width=128), axis=-1))  # [T, V]
    want_prompt = [logp[t - 1, seq[t]] for t in range(1, len(p))]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    np.testing.assert_allclose(out.prompt_logprobs[1:], want_prompt, rtol=1e-4, atol=1e-4)
    want_out = [logp[len(p) - 1 + j, tok] for j, tok in enumerate(out.token_ids)]
    np.testing.assert_allclose(out.logprobs, want_out, rtol=1e-4, atol=1e-4)


def assert_most_likely(tops, logp, n: int, where: str) -> None:
    """tops ((id, logprob), ...) is the n most likely tokens of the log-softmax logp [V], most likely first (up
    to near-ties: the engine's logits and the reference's differ in rounding)."""
    assert len(tops) == n, where
    ids = [t for t, _ in tops]
    got = np.array([lp for _, lp in tops])
    np.testing.assert_allclose(got, logp[ids], rtol=1e-4, atol=1e-4, err_msg=where)
    assert len(set(ids)) == n and (np.diff(got) <= 1e-6).all(), where
    rest = np.delete(logp, ids)
    assert not n or got.min() >= rest.max() - 1e-4, f"{where}: a more likely token was left out"


@jax.default_matmul_precision("highest")
def test_top_logprobs_are_the_models_most_likely_tokens_when_sampling_and_preempted(params, prompts):
    """With logprobs N and prompt_logprobs M the engine reports the N (M) most likely tokens and their logprobs
    at every output (prompt) position: the top of the model's log-softmax there, most likely first, whatever
    was sampled, also for sequences preempted and recomputed (the pool of test_preemption_keeps_greedy_outputs),
    with requests asking for different counts (0 to 20, or none) sharing steps."""
    counts = [(5, 3), (1, 1), (0, 20), (20, 0), (3, None)]  # (logprobs, prompt_logprobs) of request i
    sps = [SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=n, prompt_logprobs=m)
           for n, m in (counts[i % len(counts)] for i in range(len(prompts)))]
    done, preempted = run_staggered(engine(params, num_pages=13, max_model_len=96), prompts, sps, arrive_every=1)
    assert preempted > 0, "the pool was meant to force preemption"
    sampled_other = 0
    for i, p in enumerate(prompts):
        out, (n, m) = done[f"r{i}"], counts[i % len(counts)]
        seq = p + out.token_ids
        logits = dense_logits(CFG, params, seq, width=128)
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # [T, V]: row t is position t + 1's
        if m is None:
            assert out.prompt_logprobs is None and out.prompt_top_logprobs is None
        else:
            assert out.prompt_top_logprobs[0] is None and len(out.prompt_top_logprobs) == len(p)
            for t in range(1, len(p)):
                assert_most_likely(out.prompt_top_logprobs[t], logp[t - 1], m, f"request {i} prompt token {t}")
        assert len(out.top_logprobs) == len(out.logprobs) == len(out.token_ids)
        for j, tok in enumerate(out.token_ids):
            assert_most_likely(out.top_logprobs[j], logp[len(p) - 1 + j], n, f"request {i} output {j}")
            np.testing.assert_allclose(out.logprobs[j], logp[len(p) - 1 + j, tok], rtol=1e-4, atol=1e-4)
            sampled_other += tok != logp[len(p) - 1 + j].argmax()
    assert sampled_other > 0, "temperature 1 was meant to sample tokens other than the most likely"


def _penalized_reference(logits: np.ndarray, prompt: list[int], output: list[int], sp: SamplingParams) -> np.ndarray:
    """vLLM's penalties over one row of logits [V], written out token by token (not the engine's code)."""
    out = logits.astype(np.float64).copy()
    for t in set(prompt) | set(output):
        out[t] = out[t] / sp.repetition_penalty if out[t] > 0 else out[t] * sp.repetition_penalty
    for t in set(output):
        out[t] -= sp.frequency_penalty * output.count(t) + sp.presence_penalty
    return out


@jax.default_matmul_precision("highest")
def test_penalties_and_min_p_shape_each_requests_choice(params, prompts):
    """Greedy requests with repetition / frequency / presence penalties pick, at every output position, the
    argmax of the model's logits penalized for that request's own prompt and output so far (vLLM's rules),
    while a request without them stays plain greedy in the same steps, also through preemption and with the
    last token still on the device at each launch; min-p at temperature 1 only ever samples tokens at least
    min_p times as likely as the most likely one."""
    sps = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.8),
           SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.7),
           SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=0.8,
                          presence_penalty=-0.5),
           SamplingParams(temperature=1.0, seed=5, max_tokens=14, ignore_eos=True, min_p=0.5)]
    sps = [sps[i % len(sps)] for i in range(len(prompts))]
    done, preempted = run_staggered(engine(params, num_pages=13, max_model_len=96), prompts, sps, arrive_every=1)
    assert preempted > 0, "the pool was meant to force preemption"
    changed = 0
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        out = done[f"r{i}"].token_ids
        logits = dense_logits(CFG, params, p + out, width=128)
        rows = np.asarray(logits[len(p) - 1: len(p) - 1 + len(out)], np.float64)  # [n, V]: output j's
        for j, tok in enumerate(out):
            if sp.temperature > 0:  # min-p
                prob = np.exp(rows[j] - rows[j].max())
                assert prob[tok] >= sp.min_p - 1e-6, f"request {i} output {j}: p = {prob[tok]:.3f} of the top"
                continue
            want = _penalized_reference(rows[j], p, out[:j], sp)
            assert want[tok] >= want.max() - 1e-4, f"request {i} output {j}: {tok}, not {want.argmax()}"
            changed += sp.penalized and tok != rows[j].argmax()
    assert changed > 0, "the penalties were meant to change some choices"


@jax.default_matmul_precision("highest")
def test_logit_bias_and_min_tokens(params, prompts):
    """A greedy request with logit_bias picks the argmax of the logits plus its biases at every position;
    min_tokens keeps EOS and stop token ids from ending a request early however likely they are: with EOS
    pushed up by 100, a request stops at once without min_tokens, and on its (min_tokens + 1)-th token with
    it; the same for a stop token id. Requests without either stay plain greedy in the same steps."""
    eos = CFG.eos_token_ids[0]
    greedy = dict(temperature=0, max_tokens=12)
    bias = ((5, 3.0), (17, 4.5), (40, -100.0))
    sps = [SamplingParams(**greedy, ignore_eos=True, logit_bias=dict(bias)),
           SamplingParams(**greedy, logit_bias={eos: 100.0}),
           SamplingParams(**greedy, logit_bias={eos: 100.0}, min_tokens=4),
           SamplingParams(**greedy, ignore_eos=True, logit_bias={9: 100.0}, stop_token_ids=[9], min_tokens=6),
           SamplingParams(**greedy, ignore_eos=True)]
    done, _ = run_staggered(engine(params), prompts[:5], sps, arrive_every=1)
    outs = [done[f"r{i}"] for i in range(5)]
    assert (outs[1].token_ids, outs[1].finish_reason) == ([eos], "stop")
    assert (outs[2].token_ids[4:], outs[2].finish_reason) == ([eos], "stop") and eos not in outs[2].token_ids[:4]
    assert (outs[3].token_ids[6:], outs[3].finish_reason) == ([9], "stop") and 9 not in outs[3].token_ids[:6]
    for i in (0, 4):
        p, out = prompts[i], outs[i].token_ids
        logits = dense_logits(CFG, params, p + out, width=128)
        rows = np.asarray(logits[len(p) - 1: len(p) - 1 + len(out)], np.float64)
        for t, b in (bias if i == 0 else ()):
            rows[:, t] += b
        np.testing.assert_array_equal(rows.argmax(-1), out, err_msg=f"request {i}")
    assert 40 not in outs[0].token_ids and {5, 17} & set(outs[0].token_ids)


def test_bad_requests_are_named_and_leave_others_unharmed(params, prompts):
    eng = engine(params, max_model_len=64)
    eng.add_request("good", prompts[0], GREEDY)
    cases = {
        "empty": ([], GREEDY, "empty prompt"),
        "long": ([5] * 65, GREEDY, "max_model_len"),
        "vocab": ([1, CFG.vocab_size + 3], GREEDY, "outside the vocabulary"),
        "stop_vocab": ([1, 2], SamplingParams(stop_token_ids=[CFG.vocab_size]), "stop token id 103 is outside"),
    }
    for rid, (prompt, sp, msg) in cases.items():
        with pytest.raises(ValueError, match=msg) as e:
            eng.add_request(rid, prompt, sp)
        assert repr(rid) in str(e.value)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert list(done) == ["good"]
    assert done["good"].token_ids == static_tokens(params, [prompts[0]], GREEDY.max_tokens)[0]
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False,
              max_model_len=64)
    with pytest.raises(ValueError, match="^prompt 1: prompt has 70 tokens, more than max_model_len 64$") as e:
        llm.generate([prompts[0], [5] * 70], GREEDY, use_tqdm=False)
    assert e.value.field == "prompt"  # LLM names the prompt by its number, not by the engine's request id
    assert not llm.engine.has_unfinished(), "the valid prompt of a rejected call was left queued"


def test_token_ids_that_are_not_integers_are_refused_not_truncated(params, prompts):
    """int() would run [1.7, 2.2] as [1, 2] and ["7", "8"] as [7, 8]: a prompt nobody asked for. A token id
    must be an integer (numpy and jax integer scalars are); a flat float array is one prompt, refused."""
    eng = engine(params, max_model_len=64)
    for bad, x in (([1.7, 2.2], 1.7), (["7", "8"], "7"), ([5, True], True), ([3, np.float32(4)], np.float32(4))):
        with pytest.raises(ValueError, match=f"request 'r': token id {re.escape(repr(x))} .* is not an integer"):
            eng.add_request("r", bad, GREEDY)
    assert not eng.has_unfinished()
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False,
              max_model_len=64)
    with pytest.raises(ValueError, match="prompt 0: .*token id 5.0 .* is not an integer"):
        llm.generate(np.array([5.0, 6.0]), GREEDY, use_tqdm=False)
    want = static_tokens(params, [prompts[0]], GREEDY.max_tokens)[0]
    for ok in (np.array(prompts[0], np.int64), [jnp.array(prompts[0])], [np.array(prompts[0], np.int32)]):
        assert llm.generate(ok, GREEDY, use_tqdm=False)[0].token_ids == want


def test_prompts_that_are_neither_text_nor_token_ids_are_refused_by_name(params, prompts):
    # bytes ran as the token ids of their byte values, and a dict (vLLM's {"prompt": ...} form) failed
    # with KeyError: 0 or ran its keys as token ids.
    llm = LLM((CFG, params, None), max_num_seqs=4, prefill_chunk=16, page_size=8, num_pages=40, progress=False,
              max_model_len=64)
    for bad, kind in ((b"abc", "bytes"), ({"prompt_token_ids": prompts[0]}, "dict"), ({0: 5, 1: 6}, "dict"),
                      ([prompts[0], {"prompt": "hi"}], "dict")):
        with pytest.raises(ValueError, match=f"prompt {1 if isinstance(bad, list) else 0}: .*{kind}"):
            llm.generate(bad, GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError, match="request 'r': .*bytearray"):
        engine(params, max_model_len=64).add_request("r", bytearray(b"ab"), GREEDY)


def test_per_request_density_serves_dense_and_sparse_side_by_side(params, prompts):
    """One engine, one batch: a request asking for density 1 gets the dense tokens, one left at the config's
    density (oracle, 1 of 2 KV heads) gets the static sparse path's tokens."""
    sp = SparsityConfig(attn="oracle", attn_density=0.5)
    eng = engine(params, sparsity=sp, per_request_density=True)
    picks = prompts[:4]
    for i, p in enumerate(picks):
        eng.add_request(f"r{i}", p, GREEDY, attn_density=1.0 if i % 2 == 0 else None)
    with pytest.raises(ValueError, match="attn_density must lie in"):
        eng.add_request("bad", picks[0], GREEDY, attn_density=1.5)
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    dense = static_tokens(params, picks, GREEDY.max_tokens)
    sparse = static_tokens(params, picks, GREEDY.max_tokens, sparsity=sp)
    for i in range(len(picks)):
        want = dense[i] if i % 2 == 0 else sparse[i]
        assert done[f"r{i}"].token_ids == want, f"request {i}"
    assert any(dense[i] != sparse[i] for i in range(len(picks)))


@pytest.mark.parametrize("program", ["decode", "mixed", "sample", "sample_filtered", "sample_penalized_biased"])
def test_programs_read_nothing_back_mid_step(params, program):
    """The dense decode, mixed and sampler programs hold no conditional: XLA on a GPU copies a conditional's
    predicate to the host, which blocks the dispatch until the step is done and so the overlap of host and
    device work (a top-p `lax.cond` in the sampler once cost ~1 ms of every 16 ms step and all of the
    overlap)."""
    from polar_jax.engine import model_runner as mr

    r = engine(params, compile=False).runner
    fwd, smp = r._decode_args([], 4)
    if program == "decode":
        lowered = mr._DECODE.lower(CFG, None, params, r.k, r.v, r.last, *fwd)
    elif program == "mixed":
        S = r.buckets.prefill[0]
        lowered = mr._MIXED.lower(CFG, None, r._max_new(S), params, r.k, r.v, r.last, *fwd,
                                  *r._prefill_args([], S)[0])
    else:
        logits = jnp.zeros((4, CFG.vocab_size), jnp.float32)
        penalties = bias = None
        if program == "sample_penalized_biased":  # and the top-20 variant
            penalties = (np.full((4, 16), -2, np.int32), np.zeros(4, np.int32), np.zeros(4, np.float32),
                         np.zeros(4, np.float32), np.ones(4, np.float32))
            bias = (np.full((4, 8), -1, np.int32), np.zeros((4, 8), np.float32))
        top = 20 if penalties else 1
        lowered = mr._SAMPLE.lower(program == "sample_filtered", top, r.last, logits, *smp, penalties, bias)
    hlo = lowered.as_text()
    assert "stablehlo.case" not in hlo and "stablehlo.if" not in hlo


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("program", ["decode", "mixed", "prefill_logprobs"])
def test_programs_update_the_page_pool_in_place(params, program, sparse):
    """No program copies the KV page pool: every step donates it and writes only its new tokens. (A mixed
    step once wrote the riders' KV after the prefill's attention had read the pool, and XLA copied the whole
    pool per layer to keep the read's version alive: 1 s a step for llama-3-8b on an H100, not 45 ms.)"""
    from polar_jax.engine import model_runner as mr

    sp = SparsityConfig(attn="random", attn_density=0.5) if sparse else None
    r = engine(params, compile=False, sparsity=sp).runner
    S = r.buckets.prefill[0]
    prefill = r._prefill_args([], S)[0]
    decode = r._decode_args([], 4)[0]
    if program == "decode":
        compiled = mr._DECODE.lower(CFG, sp, params, r.k, r.v, r.last, *decode)
    elif program == "mixed":
        compiled = mr._MIXED.lower(CFG, sp, r._max_new(S), params, r.k, r.v, r.last, *decode, *prefill)
    else:
        compiled = mr._PREFILL_LOGPROBS.lower(CFG, r._max_new(S), 1, params, r.k, r.v, *prefill, r._targets([], S))
    pool = "f32[" + ",".join(map(str, r.k.shape)) + "]"
    copies = [line for line in compiled.compile().as_text().splitlines() if f"= {pool}" in line and " copy(" in line]
    assert not copies, copies


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("program", ["decode", "mixed", "prefill_logprobs", "unified"])
def test_programs_touch_only_the_pages_they_use(params, program, dtype):
    """On the CPU no program makes an op over the whole KV page pool but its in-place writes, so a step costs
    the pages it uses, not the pool's size. Each program once converted both bf16 (and f32) pools to raw bits
    at its start and back at its end (pallas_kernels.common.raw_bits), and a prefill's layer loop did so every
    layer and also converted the pool to f32 for its attention (benchmarks/results/cpu/cpu_pool_step_before.md:
    a step's time grew with the pool)."""
    from benchmarks.cpu_pool_step import whole_pool_ops
    from polar_jax.engine import model_runner as mr

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU's programs: on a GPU the kernels read and write the pool")
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    r = engine(params, compile=False, batch_invariant=program == "unified").runner
    S = r.buckets.prefill[0]
    decode = r._decode_args([], 4)[0]
    if program == "decode":
        lowered = mr._DECODE.lower(CFG, None, params, r.k, r.v, r.last, *decode)
    elif program == "mixed":
        lowered = mr._MIXED.lower(CFG, None, r._max_new(S), params, r.k, r.v, r.last, *decode,
                                  *r._prefill_args([], S)[0])
    elif program == "prefill_logprobs":
        lowered = mr._PREFILL_LOGPROBS.lower(CFG, r._max_new(S), 1, params, r.k, r.v, *r._prefill_args([], S)[0],
                                             r._targets([], S))
    else:
        lowered = mr._UNIFIED.lower(CFG, r._max_new(S), params, r.k, r.v, r.last,
                                    *r._prefill_args([], S, n_decode=0)[0])
    hlo, dims = lowered.compile().as_text(), "[" + ",".join(map(str, r.k.shape)) + "]"
    bad = whole_pool_ops(hlo, r.k.shape)
    assert not bad, bad
    assert any(" scatter(" in line and dims in line for line in hlo.splitlines())  # the checker saw the writes


@pytest.mark.parametrize("V", [300, 4097, 49152])
@pytest.mark.parametrize("k", [2, 20])
def test_most_likely_equals_a_full_top_k(V, k):
    """The sampler's two-pass top-k (group maxima, then the best groups' tokens) gives lax.top_k's ids and
    values exactly, order among equal values included, for vocabularies that are not whole groups."""
    from polar_jax.engine.sampler import most_likely

    rng = np.random.default_rng(V + k)
    x = rng.normal(size=(5, V)).astype(np.float32)
    x[:, rng.integers(0, V, 40)] = x[:, :1]  # ties across groups
    x[1] = np.round(x[1], 1)  # many ties
    x[2, -1] = 10.0  # the last, partial group holds the most likely token
    ids, values = most_likely(jnp.asarray(x), k)
    want_values, want_ids = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))


def test_sampler_filters_only_the_rows_that_ask():
    """Top-k / top-p / min-p cut each asking row to its own set; a row that asks for none keeps every logit
    exactly (top_k 0, or the whole vocabulary), even where the nucleus sum rounds to 1 after one token (so
    its samples do not depend on whether its batch needed the sort)."""
    from polar_jax.engine.sampler import _filtered

    V = 1000
    z = np.full((5, V), -30.0, np.float32)
    z[:, 7] = 0.0  # the other 999 tokens hold ~1e-10 of the mass: the cumulative sum is 1.0 at the top token
    z[2] = np.random.default_rng(0).normal(size=V)
    z[4] = np.random.default_rng(1).normal(size=V) * 0.5
    top_k = jnp.asarray([0, 0, 5, V, 0], jnp.int32)  # row 3: a top_k of the whole vocabulary filters nothing
    top_p = jnp.asarray([1.0, 0.5, 1.0, 1.0, 1.0], jnp.float32)
    min_p = jnp.asarray([0.0, 0.0, 0.0, 0.0, 0.3], jnp.float32)
    out = np.asarray(_filtered(jnp.asarray(z), top_k, top_p, min_p))
    p4 = np.exp(z[4] - z[4].max())  # row 4's probabilities over the most likely one's
    assert np.flatnonzero(np.isfinite(out[4])).tolist() == np.flatnonzero(p4 >= 0.3).tolist()
    assert 1 < np.isfinite(out[4]).sum() < V // 2  # a cut that keeps some tokens and drops most
    np.testing.assert_array_equal(out[0], z[0])
    np.testing.assert_array_equal(out[3], z[3])
    assert np.flatnonzero(np.isfinite(out[1])).tolist() == [7]
    assert sorted(np.flatnonzero(np.isfinite(out[2])).tolist()) == sorted(np.argsort(-z[2])[:5].tolist())
    np.testing.assert_array_equal(out[2][np.isfinite(out[2])], z[2][np.isfinite(out[2])])


def test_compile_all_leaves_nothing_to_compile_under_traffic(params, prompts):
    """After start-up's compile_all, traffic (staggered arrivals, chunked prefill, mixed and decode-only steps,
    greedy and top-p requests) compiles no further model or sampler program."""
    from polar_jax.engine import model_runner as mr

    eng = engine(params)
    programs = {"decode": mr._DECODE, "mixed": mr._MIXED, "sample": mr._SAMPLE}
    before = {name: p._cache_size() for name, p in programs.items()}
    run_staggered(eng, prompts, GREEDY)
    run_staggered(eng, prompts[:3], SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=6,
                                                   ignore_eos=True), arrive_every=1)
    assert {name: p._cache_size() for name, p in programs.items()} == before


@pytest.mark.parametrize("page_size", [0, 3, 256])
def test_an_unsupported_page_size_is_named_before_anything_is_sized(params, page_size):
    with pytest.raises(ValueError, match=f"page_size={page_size} unsupported; supported: 8, 16, 32, 64, 128"):
        LLMEngine(CFG, params, None, page_size=page_size, compile=False, progress=False)


def test_default_chunk_is_capped_at_max_model_len(params):
    """A prompt never exceeds max_model_len, so no program is compiled for a longer chunk."""
    eng = LLMEngine(CFG, params, None, max_num_seqs=4, max_model_len=40, page_size=8, num_pages=40, compile=False,
                    progress=False)
    assert eng.config.prefill_chunk == 40 and eng.runner.buckets.max_new == 40
    assert eng.config.max_num_batched_tokens == 80


def test_buckets_pack_prefill_tokens_so_the_gemm_rows_align():
    """Packed prefill capacities plus the max_num_seqs riding decode rows are multiples of 128, at most
    25% apart above 512 rows, and the largest holds a step's whole token budget."""
    from polar_jax.engine.model_runner import Buckets

    b = Buckets.make(max_num_seqs=64, prefill_chunk=2048, token_budget=4096)
    rows = [S + 64 for S in b.prefill]
    assert rows[0] == 128 and all(r % 128 == 0 for r in rows)
    assert all(hi <= 1.25 * lo for lo, hi in zip(rows, rows[1:]) if lo >= 512)
    assert b.prefill[-1] >= 4096 > b.prefill[-2]
    assert (b.prefill_size(1), b.prefill_size(65), b.prefill_size(1100)) == (64, 192, 1216)
    with pytest.raises(ValueError, match="no prefill bucket holds"):
        b.prefill_size(b.prefill[-1] + 1)
    assert b.decode == (4, 8, 16, 32, 64) and b.max_new == 2048
    # The default budget is the largest capacity within two chunks: a full step fills it exactly.
    assert Buckets.default_budget(64, 2048) == 4032 and 4032 + 64 == 4096 and 4032 in b.prefill
    assert Buckets.default_budget(256, 2048) == 3840 and 3840 in Buckets.make(256, 2048, 3840).prefill
    assert Buckets.default_budget(4, 16) == 32  # no capacity within two small chunks: 2 * chunk


def test_batch_invariant_outputs_do_not_depend_on_the_batch(params, prompts):
    """bf16, batch-invariant mode: every request's greedy tokens and their log-probabilities are bit for bit the
    same whether the engine runs it alone or crowded into a pool so small that sequences are preempted and
    recomputed (other batch rows, other prompt chunking, a recompute through the prefill path)."""
    from polar_jax.engine import model_runner as mr

    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
    kw = {"batch_invariant": True, "max_num_batched_tokens": 48}
    before = mr._UNIFIED._cache_size()
    crowded, preempted = run_staggered(engine(bf16, num_pages=13, max_model_len=96, **kw), prompts, sp, arrive_every=1)
    assert preempted > 0, "the pool was meant to force preemption"
    for i, p in enumerate(prompts):
        alone, _ = run_staggered(engine(bf16, **kw), [p], sp)
        assert crowded[f"r{i}"].token_ids == alone["r0"].token_ids, f"request {i}"
        assert crowded[f"r{i}"].logprobs == alone["r0"].logprobs, f"request {i}"
    # One shape for every step: a single unified program (per pool size).
    assert mr._UNIFIED._cache_size() - before <= 2
    with pytest.raises(ValueError, match="batch_invariant=True runs decode rows"):
        engine(bf16, sparsity=SparsityConfig(attn="random", attn_density=0.5), **kw)


def test_unified_arguments_feed_only_decode_rows_from_the_device(params, prompts):
    """Batch-invariant steps: a decode row's PENDING token is read on the device at its slot; a prefill chunk
    holding a PENDING token is a scheduler bug and is refused, as in the default mode."""
    from polar_jax.engine.scheduler import PrefillChunk
    from polar_jax.engine.sequence import PENDING

    eng = engine(params, batch_invariant=True, compile=False)
    eng.add_request("a", prompts[1], GREEDY)
    eng.add_request("b", prompts[2], GREEDY)
    a, b = eng.scheduler.waiting
    a.slot, b.slot = 2, 3
    a.output_token_ids.append(PENDING)
    b.output_token_ids.append(PENDING)
    decode, chunk = PrefillChunk(a, a.num_tokens - 1, 1), PrefillChunk(b, 0, b.num_tokens)
    fwd, _ = eng.runner._prefill_args([decode], 48, n_decode=1)
    tokens, token_slots = fwd[0], fwd[-1]
    assert tokens[0] == PENDING and token_slots[0] == 2 and (token_slots[1:] == eng.runner.num_slots).all()
    with pytest.raises(RuntimeError, match="request 'b': a prefill chunk holds a token not yet sampled"):
        eng.runner._prefill_args([decode, chunk], 96, n_decode=1)


def test_default_pool_and_compile_cache_on_a_cpu(monkeypatch, tmp_path):
    """On a CPU the default pool takes its fraction of a quarter of the memory available (the whole of it
    once reserved 19 GB of a 23 GB machine for SmolLM2's README example), and $POLAR_HOME holds the compile
    cache as it holds the models."""
    from polar_jax.cache import page_bytes
    from polar_jax.engine import llm_engine

    monkeypatch.setattr(llm_engine.os, "sysconf", {"SC_AVPHYS_PAGES": 1 << 20, "SC_PAGE_SIZE": 4096}.__getitem__)
    if jax.devices()[0].memory_stats() is None or "bytes_limit" not in jax.devices()[0].memory_stats():
        want = int(0.9 * 0.25 * (4 << 30) // page_bytes(CFG, 8, jnp.float32))
        assert llm_engine.kv_pages_that_fit(CFG, jnp.float32, 8, 0.9) == want
    monkeypatch.setenv("POLAR_HOME", str(tmp_path / "home"))
    assert llm_engine.default_compile_cache() == tmp_path / "home" / "jax"
    monkeypatch.delenv("POLAR_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llm_engine.default_compile_cache() == tmp_path / "xdg" / "polar-jax" / "jax"


def test_a_pool_that_cannot_hold_one_full_sequence_is_refused_at_start(params):
    """Such an engine (or server) started, then refused every request without a small max_tokens."""
    with pytest.raises(ValueError, match=r"KV pool \(8 pages of 8 tokens\) cannot hold one sequence of "
                                         r"max_model_len 64 tokens"):
        LLMEngine(CFG, params, None, max_model_len=64, page_size=8, num_pages=8, compile=False, progress=False)
    LLMEngine(CFG, params, None, max_model_len=64, page_size=8, num_pages=9, compile=False, progress=False)


def test_random_selection_follows_the_sparsity_configs_seed(params):
    """SparsityConfig.seed was ignored by the engine (LLM, polar generate, polar serve): only
    LLMEngine(seed=) keyed random heads, and the server could not set it."""
    sp = SparsityConfig(attn="random", attn_density=0.5, seed=12345)
    kw = dict(max_model_len=64, page_size=8, num_pages=40, compile=False, progress=False)
    assert LLMEngine(CFG, params, None, sparsity=sp, **kw).runner.seed == 12345
    assert LLMEngine(CFG, params, None, sparsity=sp, seed=7, **kw).runner.seed == 7
    assert LLMEngine(CFG, params, None, **kw).runner.seed == 0
