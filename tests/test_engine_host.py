"""The serving engine's host side: sampling params, pages, scheduling, preemption, detokenisation (no JAX)."""

import random

import numpy as np
import pytest

from polar_jax.engine import (BlockManager, Detokenizer, SamplingParams, Scheduler, SchedulerConfig, Sequence,
                              SequenceStatus)
from polar_jax.engine.sequence import PENDING

EOS = 1


def fake_token(rid: int, pos: int) -> int:
    """The token a fake model samples at `pos` of request `rid`: fixed whatever else shares the batch, so
    preemption and batching must not change any request's output. About 1 in 40 is EOS."""
    h = (rid * 1_000_003 + pos * 7919 + (rid * pos) % 131) % 99991
    return EOS if h % 40 == 0 else 2 + h % 500


def make(max_num_seqs=4, budget=16, chunk=8, max_model_len=64, page_size=4, num_pages=32):
    cfg = SchedulerConfig(max_num_seqs, budget, chunk, max_model_len, page_size, num_pages)
    return Scheduler(cfg, BlockManager(num_pages, page_size))


def seq(rid, prompt_len, eos=(EOS,), **params):
    prompt = [2 + (rid * 31 + i * 17) % 500 for i in range(prompt_len)]
    return Sequence(rid, prompt, SamplingParams(**params), eos_token_ids=eos)


def sampled_for(batch, token=fake_token):
    """What a runner samples: decode sequences and chunks that reach the end of the known tokens (each the
    most likely token too)."""
    out = {}
    for s in batch.decode:
        tok = token(s.request_id, s.num_computed + 1)
        out[s.request_id] = (tok, -0.5, [tok, tok + 1], [-0.5, -0.75])
    for c in batch.prefill:
        if c.samples:
            tok = token(c.seq.request_id, c.start + c.n)
            out[c.seq.request_id] = (tok, -0.25, [tok, tok + 1], [-0.25, -0.5])
    return out


def step(sched, token=fake_token):
    batch = sched.schedule()
    return batch, sched.update(batch, sampled_for(batch, token))


def step_while(sched, cond, token=fake_token, max_steps=500):
    """Step while cond() holds; the last step's batch. Fails instead of hanging when the run stalls."""
    batch = None
    for _ in range(max_steps):
        if not cond():
            return batch
        batch, _ = step(sched, token)
    raise AssertionError(f"still going after {max_steps} steps: {sched.running} {list(sched.waiting)}")


def expected_output(rid, prompt_len, max_tokens, max_model_len, stop_ids=()):
    """The fake model's output for a request run alone, and why it ends."""
    out = []
    while True:
        t = fake_token(rid, prompt_len + len(out))
        out.append(t)
        if t == EOS or t in stop_ids:
            return out, "stop"
        if len(out) == max_tokens or prompt_len + len(out) >= max_model_len:
            return out, "length"


class FakeKV:
    """A KV cache that stores (request, position, token) per slot, to catch a page shared, lost or stale.
    `last` plays the device's last-token slots: a PENDING token (not yet seen by the host) is read there."""

    def __init__(self, num_pages, page_size):
        self.z = page_size
        self.slots = [[None] * page_size for _ in range(num_pages)]
        self.last = {}  # sequence slot -> last sampled token

    def token(self, s, pos):
        t = s.all_token_ids[pos]
        return self.last[s.slot] if t == PENDING else t

    def write(self, s, pos):
        assert pos < len(s.pages) * self.z, f"position {pos} of {s} has no page"
        page = s.pages[pos // self.z]
        assert page != 0, "page 0 is reserved"
        self.slots[page][pos % self.z] = (s.request_id, pos, self.token(s, pos))

    def check_context(self, s, n):
        """Positions [0, n) of s read back as its own tokens."""
        for pos in range(n):
            got = self.slots[s.pages[pos // self.z]][pos % self.z]
            assert got == (s.request_id, pos, self.token(s, pos)), f"{s} position {pos} reads {got}"


def run_fake_step(sched, kv, budget, chunk, in_flight=None):
    """schedule -> fake model (writes and reads the fake KV) -> update; checks the batch's contract.

    in_flight: a list for the engine's overlapped mode: the step is advanced now and applied at the next call
    (the list holds the step in flight); the finished sequences returned are the previous step's."""
    outputs = {s.request_id: list(s.output_token_ids) for s in sched.running}
    batch = sched.schedule()
    cfg = sched.config
    assert len(batch.decode) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    assert batch.num_tokens <= budget
    ids = [s.request_id for s in batch.decode] + [c.seq.request_id for c in batch.prefill]
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
    for s in batch.decode:
        assert s.status is SequenceStatus.RUNNING and s.output_token_ids and s.num_computed == s.num_tokens - 1
        kv.write(s, s.num_computed)
    for c in batch.prefill:
        assert c.start == c.seq.num_computed and 1 <= c.n <= chunk and c.start + c.n <= c.seq.prefill_target
        for pos in range(c.start, c.start + c.n):
            kv.write(c.seq, pos)
    for s in batch.decode:
        kv.check_context(s, s.num_computed + 1)
    for c in batch.prefill:
        if c.samples:
            kv.check_context(c.seq, c.start + c.n)
    for s in batch.preempted:
        assert s.status is SequenceStatus.WAITING and not s.pages and s.num_computed == 0
        assert s.output_token_ids == outputs[s.request_id], "preemption changed the outputs"
    sampled = sampled_for(batch)
    for s in batch.decode + [c.seq for c in batch.prefill if c.samples]:
        kv.last[s.slot] = sampled[s.request_id][0]
    if in_flight is None:
        finished = sched.update(batch, sampled)
    else:
        sched.advance(batch)
        finished = sched.apply(*in_flight.pop()) if in_flight else []
        if batch:
            in_flight.append((batch, sampled))
    sched.check_invariants()
    return batch, finished


@pytest.mark.parametrize("overlap", [False, True], ids=["in-step", "one-step-in-flight"])
def test_randomised_scheduler_1000_requests(overlap):
    """overlap: results applied one step late, as the engine does (EOS seen after the next step launched)."""
    rng = random.Random(1234)
    in_flight = [] if overlap else None
    n_req, max_model_len, z, num_pages, budget, chunk = 1000, 40, 4, 36, 20, 8
    sched = make(max_num_seqs=6, budget=budget, chunk=chunk, max_model_len=max_model_len, page_size=z,
                 num_pages=num_pages)
    kv = FakeKV(num_pages, z)
    reqs = {}
    for rid in range(n_req):
        prompt_len = rng.randint(1, 32) if rng.random() < 0.95 else rng.randint(33, max_model_len)
        max_tokens = rng.randint(1, 24)
        stop_ids = (rng.randint(2, 501),) if rng.random() < 0.2 else ()
        arrival = rng.randint(0, 2000)
        cancel = arrival + rng.randint(0, 100) if rng.random() < 0.15 else None
        reqs[rid] = dict(prompt_len=prompt_len, max_tokens=max_tokens, stop_ids=stop_ids, cancel=cancel,
                         want=expected_output(rid, prompt_len, max_tokens, max_model_len, stop_ids))
        reqs[rid]["arrival"] = arrival
    arrivals, cancels = {}, {}
    for rid, r in reqs.items():
        arrivals.setdefault(r["arrival"], []).append(rid)
        if r["cancel"] is not None:
            cancels.setdefault(r["cancel"], []).append(rid)

    done, seqs, preemptions, abort_states = {}, {}, 0, set()
    last_arrival = max(arrivals)
    for t in range(20_000):
        for rid in arrivals.get(t, []):
            r = reqs[rid]
            seqs[rid] = seq(rid, r["prompt_len"], max_tokens=r["max_tokens"], stop_token_ids=r["stop_ids"])
            sched.add(seqs[rid])
        for rid in cancels.get(t, []):
            s = seqs[rid]
            state = "finished" if s.is_finished else "decode" if s.output_token_ids and not s.needs_prefill \
                else "prefill" if s.status is SequenceStatus.RUNNING else "waiting"
            assert sched.abort(rid) == (state != "finished")
            if state != "finished":
                abort_states.add(state)
                assert rid not in done
                done[rid] = s
        sched.check_invariants()
        batch, finished = run_fake_step(sched, kv, budget, chunk, in_flight)
        preemptions += len(batch.preempted)
        for s in finished:
            assert s.request_id not in done, f"request {s.request_id} finished twice"
            done[s.request_id] = s
        if sched.has_unfinished():
            assert batch, f"step {t}: unfinished requests but nothing scheduled"
        elif t > last_arrival and not in_flight:
            break
    else:
        raise AssertionError("the run did not end within 20,000 steps")

    assert sorted(done) == list(range(n_req)), "not every request finished"
    assert sched.block_manager.num_free_pages == num_pages - 1
    sched.block_manager.check_invariants([])
    assert preemptions > 100, f"only {preemptions} preemptions: the pool is not small enough to test them"
    assert abort_states == {"waiting", "prefill", "decode"}, abort_states
    n_abort = 0
    for rid, s in done.items():
        want, reason = reqs[rid]["want"]
        assert s.status is SequenceStatus.FINISHED and not s.pages
        if s.finish_reason == "abort":
            n_abort += 1
            assert s.output_token_ids == want[:len(s.output_token_ids)], f"request {rid}"
        else:
            assert (s.output_token_ids, s.finish_reason) == (want, reason), f"request {rid}"
    assert n_abort > 20


def test_preemption_picks_newest_and_keeps_outputs():
    # Z=2, 3 usable pages: A (2 tokens), B and C (1 token) take one page each; A's first decode (position 2)
    # needs a second page, so the newest, C, goes, although C itself needs no page.
    sched = make(max_num_seqs=3, budget=16, chunk=16, max_model_len=32, page_size=2, num_pages=4)
    a, b, c, d = (seq(rid, n, eos=(), max_tokens=4) for rid, n in ((0, 2), (1, 1), (2, 1), (3, 1)))
    for s in (a, b, c, d):
        sched.add(s)  # D waits: max_num_seqs = 3
    batch, _ = step(sched)
    assert [(ch.seq.request_id, ch.start, ch.n) for ch in batch.prefill] == [(0, 0, 2), (1, 0, 1), (2, 0, 1)]
    assert sched.block_manager.num_free_pages == 0
    c_pages, c_out = list(c.pages), list(c.output_token_ids)
    assert c_out == [fake_token(2, 1)]

    batch, _ = step(sched)
    assert batch.preempted == [c] and batch.decode == [a, b] and not batch.prefill
    assert sched.num_preemptions == 1  # what /metrics serves as polar_preemptions_total
    assert c.status is SequenceStatus.WAITING and c.num_computed == 0 and not c.pages
    assert c.output_token_ids == c_out and list(sched.waiting) == [c, d]  # C before D
    assert a.pages[1] == c_pages[0]  # C's page went to A
    sched.check_invariants()

    # C comes back: its prompt and output so far are prefilled (all but the last token, fed by decode next),
    # and preemption changes nobody's output.
    batch = step_while(sched, lambda: c.status is SequenceStatus.WAITING)
    assert [(ch.start, ch.n, ch.samples) for ch in batch.prefill if ch.seq is c] == [(0, 1, False)]
    assert c.output_token_ids == c_out
    batch, _ = step(sched)
    assert c in batch.decode and c.output_token_ids == c_out + [fake_token(2, 2)]
    step_while(sched, sched.has_unfinished)
    for s, n in ((a, 2), (b, 1), (c, 1), (d, 1)):
        assert s.output_token_ids == expected_output(s.request_id, n, 4, 32)[0]
    assert sched.block_manager.num_free_pages == 3


def test_preemption_of_itself_when_newest():
    # Z=2, 2 usable pages, both sequences need a second page at once: A (older) gets it, B preempts itself.
    sched = make(max_num_seqs=2, budget=8, chunk=8, max_model_len=32, page_size=2, num_pages=3)
    a, b = seq(0, 2, eos=(), max_tokens=3), seq(1, 2, eos=(), max_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched)
    batch, _ = step(sched)
    assert batch.decode == [a] and batch.preempted == [b]
    # A runs alone until it finishes; B waits at the front, then gets its own outputs back.
    step_while(sched, lambda: b.status is SequenceStatus.WAITING)
    step_while(sched, sched.has_unfinished)
    for s in (a, b):
        assert s.output_token_ids == expected_output(s.request_id, 2, 3, 32)[0]
    assert sched.block_manager.num_free_pages == 2


def test_decode_batch_and_budget_limits():
    sched = make(max_num_seqs=2, budget=5, chunk=4, max_model_len=64, page_size=4, num_pages=64)
    for rid in range(5):
        sched.add(seq(rid, 6, eos=(), max_tokens=3))
    for _ in range(100):
        batch, _ = step(sched)
        assert sched.num_running <= 2 and len(batch.decode) + len(batch.prefill) <= 2
        assert batch.num_tokens <= 5
        assert all(ch.n <= 4 for ch in batch.prefill)
        if not sched.has_unfinished():
            break
    assert not sched.has_unfinished()


def test_chunked_prefill_chunks():
    sched = make(max_num_seqs=4, budget=6, chunk=4, max_model_len=64, page_size=4, num_pages=32)
    a, b = seq(0, 10), seq(1, 5)
    sched.add(a)
    sched.add(b)
    chunks = []
    for _ in range(3):
        batch, _ = step(sched)
        assert not batch.decode
        chunks.append([(ch.seq.request_id, ch.start, ch.n, ch.samples) for ch in batch.prefill])
    # Step 1: A takes a full chunk, B the 2 tokens left of the budget; then running ones continue.
    assert chunks == [[(0, 0, 4, False), (1, 0, 2, False)],
                      [(0, 4, 4, False), (1, 2, 2, False)],
                      [(0, 8, 2, True), (1, 4, 1, True)]]
    assert a.output_token_ids == [fake_token(0, 10)] and b.output_token_ids == [fake_token(1, 5)]
    assert a.num_computed == 10 and b.num_computed == 5
    batch, _ = step(sched)
    assert batch.decode == [a, b] and not batch.prefill


def test_waiting_front_blocks_admission():
    # The front request needs more pages than are free: nobody behind it overtakes it.
    sched = make(max_num_seqs=4, budget=64, chunk=64, max_model_len=64, page_size=4, num_pages=9)
    big0, big1, small = (seq(rid, n, eos=(), max_tokens=4) for rid, n in ((0, 20), (1, 20), (2, 1)))
    for s in (big0, big1, small):
        sched.add(s)
    batch, _ = step(sched)
    assert [ch.seq for ch in batch.prefill] == [big0] and list(sched.waiting) == [big1, small]


@pytest.mark.parametrize("state", ["waiting", "prefill", "decode"])
def test_abort_frees_pages_in_each_state(state):
    sched = make(max_num_seqs=1, budget=8, chunk=4, max_model_len=64, page_size=4, num_pages=16)
    free0 = sched.block_manager.num_free_pages
    other, s = seq(0, 10, eos=()), seq(1, 10, eos=())
    sched.add(other)
    sched.add(s)
    if state != "waiting":
        assert sched.abort(0)  # let s run
        step(sched)
    if state == "decode":
        step_while(sched, lambda: s.needs_prefill)
    held = len(s.pages)
    assert held == (0 if state == "waiting" else 3)
    batch = sched.schedule()
    assert sched.abort(1) and not sched.abort(1) and not sched.abort(99)
    assert s.finish_reason == "abort" and s.is_finished and not s.pages
    n_out = len(s.output_token_ids)
    assert sched.update(batch, sampled_for(batch)) == []  # aborted mid-step: its results are dropped
    assert len(s.output_token_ids) == n_out
    if state == "waiting":
        sched.abort(0)
    assert not sched.has_unfinished() and sched.block_manager.num_free_pages == free0
    sched.check_invariants()


def run_alone(s, max_model_len=64, token=fake_token):
    sched = make(max_model_len=max_model_len)
    sched.add(s)
    step_while(sched, sched.has_unfinished, token)
    assert sched.block_manager.num_free_pages == sched.config.num_pages - 1
    return s


def test_finish_reasons():
    always = lambda tok: (lambda rid, pos: tok)  # noqa: E731
    s = run_alone(seq(0, 3, max_tokens=5), token=always(EOS))
    assert (s.output_token_ids, s.finish_reason) == ([EOS], "stop")
    s = run_alone(seq(0, 3, max_tokens=5, ignore_eos=True), token=always(EOS))
    assert (s.output_token_ids, s.finish_reason) == ([EOS] * 5, "length")
    s = run_alone(seq(0, 3, max_tokens=5, stop_token_ids=[7]), token=lambda rid, pos: 7 if pos == 5 else 9)
    assert (s.output_token_ids, s.finish_reason) == ([9, 9, 7], "stop")
    s = run_alone(seq(0, 3, max_tokens=4), token=always(9))
    assert (s.output_token_ids, s.finish_reason) == ([9] * 4, "length")
    s = run_alone(seq(0, 20, max_tokens=100), max_model_len=24, token=always(9))
    assert (len(s.output_token_ids), s.num_tokens, s.finish_reason) == (4, 24, "length")
    s = run_alone(seq(0, 24, max_tokens=100), max_model_len=24, token=always(9))  # prompt fills the context
    assert (len(s.output_token_ids), s.finish_reason) == (1, "length")
    t = s.timings
    assert t.arrival <= t.first_scheduled <= t.first_token <= t.finish


def test_logprobs_recorded_only_when_asked():
    s = run_alone(seq(0, 3, max_tokens=4, logprobs=True, prompt_logprobs=True))
    assert len(s.output_logprobs) == len(s.output_token_ids) and None not in s.output_logprobs
    # sampled_for: the top-1 sampled, the second most likely its id + 1; logprobs=True asks for one of them
    assert s.output_top_logprobs == [((t, lp),) for t, lp in zip(s.output_token_ids, s.output_logprobs)]
    s = run_alone(seq(0, 3, max_tokens=4, logprobs=2))
    assert s.output_top_logprobs == [((t, lp), (t + 1, lp - 0.25)) for t, lp in zip(s.output_token_ids,
                                                                                     s.output_logprobs)]
    s = run_alone(seq(0, 3, max_tokens=4, logprobs=0))  # each token's own logprob, no alternatives
    assert None not in s.output_logprobs and s.output_top_logprobs == [()] * len(s.output_token_ids)
    s = run_alone(seq(0, 3, max_tokens=4))
    assert s.output_logprobs == [None] * len(s.output_token_ids) and s.prompt_logprobs is None
    assert s.output_top_logprobs == [None] * len(s.output_token_ids) and s.prompt_top_logprobs is None


def test_prompt_logprobs_across_chunks_and_preemption():
    s = Sequence(0, [5, 6, 7, 8, 9], SamplingParams(prompt_logprobs=2))
    # The runner reports 3 most likely tokens a position (its program's count); the request asked for 2.
    s.record_prompt_logprobs(0, [-1.0, -2.0], [[11, 1, 2], [12, 1, 2]], [[-0.1, -1, -2], [-0.2, -1, -2]])  # chunk
    # [0, 2): tokens 1 and 2
    s.record_prompt_logprobs(0, [-9.0, -9.0], [[99] * 3] * 2, [[-9.0] * 3] * 2)  # recomputed after preemption: kept
    s.record_prompt_logprobs(2, [-3.0, -4.0, -5.0], [[13, 3, 4], [14, 3, 4], [15, 3, 4]],
                             [[-0.3, -3, -4]] * 3)  # chunk [2, 5): tokens 3, 4 (5 is not a prompt token)
    assert s.prompt_logprobs == [None, -1.0, -2.0, -3.0, -4.0]
    assert s.prompt_top_logprobs == [None, ((11, -0.1), (1, -1.0)), ((12, -0.2), (1, -1.0)), ((13, -0.3), (3, -3.0)),
                                     ((14, -0.3), (3, -3.0))]


def test_add_rejects_requests_that_can_never_run():
    sched = make(max_model_len=64, page_size=4, num_pages=9)  # 8 usable pages: 32 positions
    ok = seq(0, 5, max_tokens=3)
    sched.add(ok)
    with pytest.raises(ValueError, match=r"request 1: empty prompt"):
        sched.add(Sequence(1, [], SamplingParams()))
    with pytest.raises(ValueError, match=r"request 2: prompt has 65 tokens, more than max_model_len 64"):
        sched.add(seq(2, 65))
    with pytest.raises(ValueError, match=r"request 3: needs 9 KV pages of 4 tokens, the pool has 8"):
        sched.add(seq(3, 30, max_tokens=4))  # 33 positions stored
    sched.add(seq(4, 30, max_tokens=3))  # 32 positions: fits exactly
    with pytest.raises(ValueError, match=r"request 0: request_id already in use"):
        sched.add(seq(0, 5))
    step_while(sched, sched.has_unfinished)
    assert ok.output_token_ids == expected_output(0, 5, 3, 64)[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "SamplingParams.temperature must be a finite number >= 0: got -0.5"),
    (dict(temperature=float("inf")), "SamplingParams.temperature must be a finite number >= 0: got inf"),
    (dict(top_p=0.0), "SamplingParams.top_p must be in (0, 1]: got 0.0"),
    (dict(top_p=1.5), "SamplingParams.top_p must be in (0, 1]: got 1.5"),
    (dict(top_k=-2), "SamplingParams.top_k must be an int >= 0 (0: off): got -2"),
    (dict(logprobs=21), "SamplingParams.logprobs must be None or an int in [0, 20] (how many of the most likely "
                        "tokens to report beside the chosen one): got 21"),
    (dict(prompt_logprobs=-1), "SamplingParams.prompt_logprobs must be None or an int in [0, 20] (how many of the "
                               "most likely tokens to report beside the chosen one): got -1"),
    (dict(logprobs=1.0), "SamplingParams.logprobs must be None or an int in [0, 20] (how many of the most likely "
                         "tokens to report beside the chosen one): got 1.0"),
    (dict(top_k=2.0), "SamplingParams.top_k must be an int >= 0 (0: off): got 2.0"),
    (dict(min_p=-0.1), "SamplingParams.min_p must be in [0, 1] (0: off): got -0.1"),
    (dict(logit_bias={3: 101}), "SamplingParams.logit_bias must have biases in [-100, 100] (token 3): got 101"),
    (dict(logit_bias={-1: 1}), "SamplingParams.logit_bias must have int token ids >= 0: got -1"),
    (dict(logit_bias=[3, 4]), "SamplingParams.logit_bias must be a {token id: bias} mapping: got [3, 4]"),
    (dict(min_tokens=-1), "SamplingParams.min_tokens must be an int >= 0: got -1"),
    (dict(min_p=True), "SamplingParams.min_p must be in [0, 1] (0: off): got True"),
    (dict(repetition_penalty=0), "SamplingParams.repetition_penalty must be a finite number > 0 (1: off): got 0"),
    (dict(frequency_penalty=2.5), "SamplingParams.frequency_penalty must be in [-2, 2] (0: off): got 2.5"),
    (dict(presence_penalty=float("nan")), "SamplingParams.presence_penalty must be in [-2, 2] (0: off): got nan"),
    (dict(max_tokens=0), "SamplingParams.max_tokens must be None or an int >= 1: got 0"),
    (dict(seed="1"), "SamplingParams.seed must be None or an int: got '1'"),
    (dict(stop=["ok", ""]), "SamplingParams.stop must hold non-empty strings: got ''"),
    (dict(stop_token_ids=[3, -2]), "SamplingParams.stop_token_ids must hold ints >= 0: got -2"),
    (dict(ignore_eos=1), "SamplingParams.ignore_eos must be a bool: got 1"),
    (dict(include_stop_str_in_output="yes"), "SamplingParams.include_stop_str_in_output must be a bool: got 'yes'"),
    (dict(skip_special_tokens=None), "SamplingParams.skip_special_tokens must be a bool: got None"),
])
def test_sampling_params_invalid(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message


def test_sampling_params_normalised():
    p = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0, top_p=1, top_k=5, seed=0).temperature == 0
    # vLLM's spellings of "off", which code ported from vLLM passes (all were refused)
    vllm = SamplingParams(stop=None, stop_token_ids=None, top_k=-1, logprobs=None, prompt_logprobs=0,
                          max_tokens=None)
    assert (vllm.stop, vllm.stop_token_ids, vllm.top_k, vllm.logprobs, vllm.prompt_logprobs, vllm.max_tokens) == \
        ((), (), 0, None, 0, None)  # prompt_logprobs 0, as vLLM's: each token's own logprob, no alternatives
    assert (SamplingParams(logprobs=True).logprobs, SamplingParams(logprobs=False).logprobs) == (1, None)
    assert type(SamplingParams(logprobs=np.int64(20)).logprobs) is int


def test_max_tokens_none_runs_to_the_end_of_the_context():
    sched = make(max_model_len=24, page_size=4, num_pages=32)
    s = seq(0, 10, eos=(), max_tokens=None)
    sched.add(s)
    step_while(sched, sched.has_unfinished)
    assert len(s.output_token_ids) == 24 - 10 and s.finish_reason == "length"


class ByteTokenizer:
    """Token i < 256 is byte i, 256 is a special token, above that multi-byte pieces: decoding splits
    UTF-8 characters across tokens the way byte-level BPE does."""

    SPECIAL = 256

    def __init__(self, pieces=()):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]

    def decode(self, ids, skip_special_tokens=True):
        out = b""
        for i in ids:
            if i == self.SPECIAL:
                out += b"" if skip_special_tokens else b"<s>"
            else:
                out += bytes([i]) if i < 256 else self.pieces[i - 257]
        return out.decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode())


def detok_all(tok, ids, stop=(), prompt=()):
    d = Detokenizer(tok, prompt_token_ids=prompt, stop=stop)
    deltas = [d.add_token(i) for i in ids]
    return d, deltas


def test_detokenizer_multibyte_split_across_tokens():
    tok = ByteTokenizer()
    text = "añ€😀b"
    d, deltas = detok_all(tok, tok.encode(text), prompt=tok.encode("hi "))
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    assert deltas[:3] == ["a", "", "ñ"]  # ñ is 2 bytes: nothing until its second byte
    assert d.text == text and d.flush() == "" and d.stopped is None


def test_detokenizer_stop_string_across_tokens():
    # Pieces: "Hel", "lo ", "wo", "rld!", "END"; the stop "o wor" spans three tokens.
    tok = ByteTokenizer(["Hel", "lo ", "wo", "rld!"])
    d, deltas = detok_all(tok, [257, 258, 259, 260], stop=["o wor"])
    assert deltas == ["Hel", "l", "", ""] and d.stopped == "o wor" and d.text == "Hell"
    assert d.add_token(ord("x")) == "" and d.flush() == ""


def test_detokenizer_partial_stop_held_then_released():
    tok = ByteTokenizer()
    d, deltas = detok_all(tok, tok.encode("ab#c##d"), stop=["###"])
    # "#" and "##" could begin "###": held until the next character shows they do not.
    assert deltas == ["a", "b", "", "#c", "", "", "##d"] and d.stopped is None
    d, deltas = detok_all(tok, tok.encode("ab##"), stop=["###"])
    assert deltas == ["a", "b", "", ""] and d.flush() == "##" and d.text == "ab##"


def test_detokenizer_earliest_stop_and_text_after_it_dropped():
    tok = ByteTokenizer(["xySTOPz", "END"])
    d, deltas = detok_all(tok, [ord("a"), 257, 258], stop=["END", "STOP"])
    assert deltas == ["a", "xy", ""] and d.stopped == "STOP" and d.text == "axy"


def test_detokenizer_stop_inside_multibyte_and_special_tokens():
    tok = ByteTokenizer()
    ids = [ByteTokenizer.SPECIAL] + tok.encode("1€2€3")
    d, deltas = detok_all(tok, ids, stop=["2€"])
    assert "".join(deltas) == "1€" and d.stopped == "2€"


def test_detokenizer_stop_found_while_a_split_character_is_pending():
    # Each "\x82\x86\xe3" token completes a "ゆ" and starts the next one, so the decoded text always ends
    # in U+FFFD: the stop string is complete at the fourth token and must end the text there, not only at
    # flush() (where the engine no longer cuts the tokens or says "stop").
    tok = ByteTokenizer([b"\xe3", b"\x82\x86\xe3"])
    d, deltas = detok_all(tok, [ord("x"), 257, 258, 258, 258, 258], stop=["ゆゆ"])
    assert d.stopped == "ゆゆ" and d.text == "x" and "".join(deltas) == "x"
    d = Detokenizer(tok, stop=["ゆゆ"])
    assert [d.add_token(i) for i in (ord("x"), 257, 258)] == ["x", "", ""] and d.stopped is None
    assert d.add_token(258) == "" and d.stopped == "ゆゆ"
    d, deltas = detok_all(tok, [ord("x"), 257, 258, 258], stop=["ゆゆゆ"])  # no stop yet: held, then flushed
    assert d.stopped is None and "".join(deltas) + d.flush() == "xゆゆ\ufffd"


def test_detokenizer_keeps_the_stop_string_and_special_tokens_when_asked():
    """include_stop_str_in_output: the text ends after the stop string, not before it (text after it is still
    dropped); skip_special_tokens False: special tokens' text stays (vLLM's two options)."""
    tok = ByteTokenizer(["Hel", "lo ", "wo", "rld!"])
    d = Detokenizer(tok, stop=["o wor"], include_stop=True)
    deltas = [d.add_token(i) for i in [257, 258, 259, 260]]
    assert "".join(deltas) == "Hello wor" == d.text and d.stopped == "o wor" and d.flush() == ""
    ids = [ByteTokenizer.SPECIAL] + tok.encode("ab")
    assert Detokenizer(tok).add_token(ids[0]) == ""
    d = Detokenizer(tok, skip_special_tokens=False)
    assert "".join(d.add_token(i) for i in ids) + d.flush() == "<s>ab"


def test_detokenizer_stop_strings_count_only_from_min_tokens():
    """min_tokens (vLLM's): a stop string in the first min_tokens - 1 tokens' text does not end it; one that
    the min_tokens-th token completes does, even when it began before."""
    tok = ByteTokenizer()
    d = Detokenizer(tok, stop=["ab"], min_tokens=4)
    assert "".join(d.add_token(i) for i in tok.encode("ab")) == "ab" and d.stopped is None
    assert d.add_token(ord("a")) == "" and d.add_token(ord("b")) == "" and d.stopped == "ab" and d.text == "ab"


def test_block_manager_pages_and_invariants():
    bm = BlockManager(8, 4)
    a, b = Sequence(0, [5] * 9), Sequence(1, [5])
    assert bm.can_allocate(a, 9)
    bm.allocate(a, 9)  # 9 positions: 3 pages
    a.num_computed = 9
    assert len(a.pages) == 3 and bm.num_free_pages == 4
    bm.allocate(a, 3)  # positions 9..11 fit the third page
    assert len(a.pages) == 3
    assert bm.can_allocate(b, 16) and not bm.can_allocate(b, 17)
    bm.allocate(b, 16)
    assert 0 not in a.pages + b.pages and sorted(a.pages + b.pages) == list(range(1, 8))
    with pytest.raises(RuntimeError, match="request 1 needs 1 pages, 0 free"):
        b.num_computed = 16
        bm.allocate(b, 1)
    bm.check_invariants([a, b])
    b.pages.append(a.pages[0])
    with pytest.raises(AssertionError, match=f"page {a.pages[0]} of request 1 is not its own alone"):
        bm.check_invariants([a, b])
    b.pages.pop()
    with pytest.raises(AssertionError, match="leaked"):
        bm.check_invariants([a])
    bm.free(a)
    bm.free(b)
    assert a.pages == b.pages == [] and bm.num_free_pages == 7
    bm.check_invariants([])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0), "SchedulerConfig.max_num_seqs must be >= 1: got 0"),
    (dict(num_pages=1), "SchedulerConfig.num_pages must be >= 2 (page 0 is reserved): got 1"),
    (dict(max_num_seqs=8, budget=4), "SchedulerConfig.max_num_batched_tokens (4) must be >= max_num_seqs (8)"),
])
def test_scheduler_config_invalid(kwargs, message):
    with pytest.raises(ValueError) as e:
        make(**kwargs)
    assert str(e.value) == message
