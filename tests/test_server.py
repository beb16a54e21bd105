"""The OpenAI-compatible server on a tiny random model with a character tokenizer (CPU), through the official
`openai` client and raw HTTP: streamed and whole answers agree and equal the offline engine's; echo logprobs
are the model's log-softmax; 64 concurrent streams each get their own answer; bad input gets 400 naming the
field; a disconnect frees the request's pages; a real `polar serve` process checks the API key, answers 429
when full, serves `polar bench serve` and exits cleanly on SIGTERM."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import types
from functools import partial
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from polar_jax import (LLM, SamplingParams, SparsityConfig, forward, init_cache, init_params,  # noqa: E402
                       preset)
from polar_jax.checkpoint import load, save  # noqa: E402
from polar_jax.engine.llm_engine import LLMEngine  # noqa: E402
from polar_jax.server.app import DrainingServer, build_app  # noqa: E402
from polar_jax.server.cli import main as server_cli  # noqa: E402

CFG = preset("tiny-llama-gqa").replace(max_positions=128)
MODEL = "tiny"
# The same engine shapes everywhere, so the test server, the offline reference and the subprocess share
# compiled programs through JAX's persistent cache.
ENGINE_KW = dict(max_num_seqs=16, prefill_chunk=32, page_size=8, num_pages=200, max_model_len=128)
USABLE_PAGES = ENGINE_KW["num_pages"] - 1
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ROOT = Path(__file__).resolve().parents[1]


def make_model_dir(out: Path) -> Path:
    """A tiny random llama with a character-level tokenizer (one token per character, ids < vocab size)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,!?'<>|_:\n-"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    assert len(vocab) <= CFG.vocab_size and CFG.eos_token_ids == (2,)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out.parent / "tokenizer")
    return save(out, CFG, init_params(CFG, jax.random.key(0), jnp.float32), tokenizer_dir=out.parent / "tokenizer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def metrics(url: str) -> dict[str, float]:
    """/metrics samples as {name{labels}: value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("server") / MODEL)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(model_dir)


APPS = {}  # base URL -> the app that `serving` runs there


@contextlib.contextmanager
def serving(engine):
    """uvicorn in a thread on a free port serving `engine`; yields the base URL."""
    app = build_app(engine, MODEL)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = DrainingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 60, "the test server to start")
    APPS[url] = app
    try:
        yield url
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def served(loaded):
    """(base URL, the engine) of a dense server."""
    cfg, params, tokenizer = loaded
    engine = LLMEngine(cfg, params, tokenizer, progress=False, **ENGINE_KW)
    with serving(engine) as url:
        yield url, engine


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def offline(loaded):
    return LLM(loaded, progress=False, **ENGINE_KW)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def offline_one(offline, prompt, sp: SamplingParams):
    return offline.generate([prompt], sp, use_tqdm=False)[0]


# ---------------------------------------------------------------------------------------------------
# answers

def test_completion_stream_equals_whole_and_offline(client, offline, loaded):
    prompt, n = "The quick brown fox", 12
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    want = offline_one(offline, loaded[2].encode(prompt), SamplingParams(temperature=0, max_tokens=n,
                                                                          ignore_eos=True))
    assert whole.choices[0].text == streamed == want.text
    assert whole.choices[0].finish_reason == "length" and chunks[-2].choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == n
    assert chunks[-1].usage.completion_tokens == n and not chunks[-1].choices
    assert sum(1 for c in chunks if c.choices) == n  # a chunk per token (one character each here)


def test_chat_stream_equals_whole_and_offline(client, offline, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    tokenizer = loaded[2]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = offline_one(offline, list(ids), SamplingParams(temperature=0, max_tokens=10))
    assert whole.choices[0].message.content == streamed == want.text
    assert whole.choices[0].finish_reason == want.finish_reason
    assert stream[0].choices[0].delta.role == "assistant"
    assert whole.usage.prompt_tokens == len(ids) and whole.usage.completion_tokens == len(want.token_ids)
    assert stream[-1].usage == whole.usage and not stream[-1].choices


@pytest.mark.parametrize("path,prompt", [("completions", {"prompt": "the fox"}),
                                         ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_stream_chunks_share_one_created_time_and_deltas_leave_out_the_role(server, monkeypatch, path, prompt):
    """OpenAI's stream: every chunk of a response has the response's `created`, and a chat delta after the
    first leaves its role out (not null). The clock the response models read runs on a second a call here."""
    from polar_jax.server import protocol

    ticks = iter(range(10**9, 10**9 + 10**4))
    monkeypatch.setattr(protocol, "time", types.SimpleNamespace(time=lambda: next(ticks)))
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}} | prompt
    with httpx.stream("POST", f"{server}/v1/{path}", json=body, timeout=60) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert len(chunks) >= 6 and len({c["created"] for c in chunks}) == 1
    if path == "chat/completions":
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert all("role" not in d and set(d) == {"content"} for d in deltas[1:]), deltas


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_equal_the_models_log_softmax(client, loaded, max_tokens, stream):
    """What lm-evaluation-harness's local-completions asks: the prompt's own logprobs (token ids in), and the
    most likely token at each position beside the token itself."""
    cfg, params, tokenizer = loaded
    rng = np.random.default_rng(max_tokens)
    prompt = rng.integers(3, 60, 37).tolist()  # ordinary characters, two prefill chunks
    kw = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1, temperature=0)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
        text = "".join(c.text for c in chunks)
        got = [x for c in chunks for x in c.logprobs.token_logprobs]
        tokens = [x for c in chunks for x in c.logprobs.tokens]
        top = [x for c in chunks for x in c.logprobs.top_logprobs]
        offsets = [x for c in chunks for x in c.logprobs.text_offset]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, got, tokens, top, offsets = (choice.text, choice.logprobs.token_logprobs, choice.logprobs.tokens,
                                           choice.logprobs.top_logprobs, choice.logprobs.text_offset)
    # Each token is one character or none (a special token): offsets count the characters before it, and run
    # on across a stream's chunks.
    assert offsets == np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist() and offsets[-1] <= len(text)
    logits, _, _ = forward(cfg, params, jnp.asarray([prompt]), init_cache(cfg, 1, 128, jnp.float32))
    logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))  # [T, V]
    assert len(got) == len(tokens) == len(top) == len(prompt) + max_tokens and got[0] is None and top[0] is None
    np.testing.assert_allclose(got[1:len(prompt)], [logp[t - 1, prompt[t]] for t in range(1, len(prompt))],
                               rtol=1e-4, atol=1e-4)
    assert tokens[:len(prompt)] == [tokenizer.decode([t]) for t in prompt]
    for t in range(1, len(prompt) + max_tokens):  # the argmax of the position before, and the token itself
        want = {tokenizer.decode([int(logp[t - 1].argmax())]): logp[t - 1].max(), tokens[t]: got[t]}
        assert top[t].keys() == want.keys()
        assert list(top[t].values()) == pytest.approx(list(want.values()), abs=1e-4)
    if max_tokens == 1:  # greedy: the generated token is the argmax of the last position
        assert got[-1] == pytest.approx(logp[-1].max(), abs=1e-4)
        assert text == tokenizer.decode(prompt) + tokenizer.decode([int(logp[-1].argmax())])
    else:
        assert text == tokenizer.decode(prompt)


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's local-completions reading of an echo + logprobs answer."""
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(token_logprobs), all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs))


def test_lm_eval_loglikelihood_request(server, offline):
    """lm-eval's payload for a context + its greedy continuation: greedy; with one token changed: not, and a
    lower loglikelihood."""
    ctx = [7, 20, 33, 41, 12, 9]
    cont = offline_one(offline, ctx, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).token_ids
    changed = list(cont)
    changed[3] = 3 + (cont[3] - 3 + 1) % 60  # another token
    payload = {"model": MODEL, "prompt": [ctx + cont, ctx + changed], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(f"{server}/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    (ll, greedy), (ll_changed, greedy_changed) = [lm_eval_parse(c, len(ctx)) for c in r.json()["choices"]]
    assert greedy and not greedy_changed and ll > ll_changed


def test_64_concurrent_streams_each_equal_their_offline_result(server, offline):
    rng = np.random.default_rng(7)
    cases = []
    for i in range(64):
        prompt = rng.integers(3, 70, int(rng.integers(1, 41))).tolist()
        kind = i % 4
        sp = dict(temperature=0.0, max_tokens=int(rng.integers(1, 11)), seed=1000 + i, ignore_eos=bool(i % 3))
        if kind == 1:
            sp |= dict(temperature=1.3)
        elif kind == 2:
            sp |= dict(temperature=0.8, top_k=5)
        elif kind == 3:
            sp |= dict(temperature=1.0, top_p=0.7)
        cases.append((prompt, sp))
    want = offline.generate([p for p, _ in cases], [SamplingParams(**sp) for _, sp in cases], use_tqdm=False)

    async def one(aclient, prompt, sp):
        extra = {"ignore_eos": sp["ignore_eos"], "top_k": sp.get("top_k", 0)}
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=sp["max_tokens"], temperature=sp["temperature"],
            top_p=sp.get("top_p", 1.0), seed=sp["seed"], stream=True, logprobs=1,
            stream_options={"include_usage": True}, extra_body=extra)
        text, tokens, finish, usage = "", [], None, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].text
                tokens += c.choices[0].logprobs.token_logprobs
                finish = c.choices[0].finish_reason or finish
            usage = c.usage or usage
        return text, len(tokens), finish, usage.completion_tokens

    async def all_of_them():
        aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
        async with aclient:
            return await asyncio.wait_for(asyncio.gather(*(one(aclient, p, sp) for p, sp in cases)), 150)

    got = asyncio.run(all_of_them())
    assert len({w.text for w in want}) > 50, "the cases should give mostly different answers"
    for i, ((text, n_logprobs, finish, n_usage), w) in enumerate(zip(got, want)):
        assert (text, finish) == (w.text, w.finish_reason), f"request {i}"
        assert n_logprobs == n_usage == len(w.token_ids), f"request {i}"
    m = metrics(server)
    assert m["polar_kv_pages_free"] == USABLE_PAGES and m["polar_requests_running"] == 0


def test_several_prompts_in_one_request(client, offline, loaded):
    prompts = ["abc", "Hello there", "z"]
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    want = offline.generate([loaded[2].encode(p) for p in prompts], sp, use_tqdm=False)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [w.text for w in want]
    assert out.usage.prompt_tokens == sum(map(len, prompts)) and out.usage.completion_tokens == 15


def test_n_choices_per_prompt(client, offline, loaded):
    """n > 1 (refused before): a prompt's n choices side by side, choice j of a seeded request sampled with
    seed + j (as vLLM's), the prompt's tokens counted once; streamed, each chunk names its choice."""
    prompts, n = ["abc", "Hello there"], 3
    kw = dict(model=MODEL, prompt=prompts, n=n, max_tokens=6, temperature=1.0, seed=5,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    want = offline.generate([loaded[2].encode(p) for p in prompts for _ in range(n)],
                            [SamplingParams(temperature=1.0, seed=5 + j, max_tokens=6, ignore_eos=True)
                             for _ in prompts for j in range(n)], use_tqdm=False)
    assert [c.index for c in whole.choices] == list(range(len(prompts) * n))
    assert [c.text for c in whole.choices] == [w.text for w in want]
    assert len({c.text for c in whole.choices[:n]}) > 1, "a prompt's choices should be different samples"
    assert whole.usage.prompt_tokens == sum(map(len, prompts)) and whole.usage.completion_tokens == 6 * n * 2
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = [""] * len(want)
    for c in chunks[:-1]:
        streamed[c.choices[0].index] += c.choices[0].text
    assert streamed == [w.text for w in want] and chunks[-1].usage == whole.usage

    messages = [{"role": "user", "content": "hi"}]
    ids = list(loaded[2].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    kw = dict(model=MODEL, messages=messages, n=2, max_tokens=5, temperature=1.0, seed=7, logprobs=True)
    chat = client.chat.completions.create(**kw)
    want = offline.generate([ids, ids], [SamplingParams(temperature=1.0, seed=7 + j, max_tokens=5, logprobs=True)
                                         for j in range(2)], use_tqdm=False)
    assert [(c.index, c.message.content) for c in chat.choices] == [(j, w.text) for j, w in enumerate(want)]
    assert [[x.logprob for x in c.logprobs.content] for c in chat.choices] == [w.logprobs for w in want]
    assert chat.usage.prompt_tokens == len(ids) and chat.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, roles = ["", ""], set()
    for c in stream[:-1]:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
        roles |= {c.choices[0].index} if c.choices[0].delta.role == "assistant" else set()
    assert texts == [w.text for w in want] and roles == {0, 1} and stream[-1].usage == chat.usage


def test_ignore_eos_decodes_past_the_eos_token(served, client, offline, loaded, monkeypatch):
    """ignore_eos (vLLM's extension field) reaches the engine: once the 4th token of the greedy answer is made
    the EOS, a request stops at its first occurrence without the field and runs to max_tokens with it."""
    _, engine = served
    prompt, n = "Tell me", 10
    kw = dict(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    free = offline_one(offline, loaded[2].encode(prompt), SamplingParams(temperature=0, max_tokens=n,
                                                                          ignore_eos=True))
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)  # the answer may hold that token before position 3
    monkeypatch.setattr(engine, "cfg", engine.cfg.replace(eos_token_ids=(eos,)))  # read by add_request
    stopped = client.completions.create(**kw)
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", first + 1)
    ignored = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert (ignored.choices[0].finish_reason, ignored.usage.completion_tokens) == ("length", n)
    assert ignored.choices[0].text == free.text


def test_metrics_decode_batch_counts_rows_and_steps(server, client):
    """polar_decode_batch: one observation per decoding step, of the requests decoded in it."""
    before = metrics(server)
    client.completions.create(model=MODEL, prompt=["abc", "xyz"], max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
    after = metrics(server)
    # Prefilled together (the first token), then 5 decode steps of both.
    assert after["polar_decode_batch_count"] - before["polar_decode_batch_count"] == 5
    assert after["polar_decode_batch_sum"] - before["polar_decode_batch_sum"] == 10


# ---------------------------------------------------------------------------------------------------
# bad input

BAD = [
    # (path, body, status, param, message part)
    ("completions", b'{"model": "tiny", "prompt": "x"', 400, None, "malformed JSON"),
    ("completions", {"model": "gpt-9", "prompt": "x"}, 404, "model", "does not exist"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than or equal"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ("completions", {"model": MODEL, "prompt": [True, False]}, 400, "prompt", "valid"),  # not token ids 1, 0
    ("completions", {"model": MODEL, "prompt": [[1.0, 2]]}, 400, "prompt", "valid"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "context length 128"),
    ("completions", {"model": MODEL, "prompt": "a" * 129, "max_tokens": 0}, 400, "prompt", "129 tokens"),
    ("completions", {"model": MODEL, "prompt": "a" * 128, "max_tokens": None}, 400, "prompt",
     "fills the context length 128: no room to generate"),  # was 200 with an empty text
    ("completions", {"model": MODEL, "prompt": [5, 103]}, 400, "prompt", "outside the vocabulary"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt", "the prompt is empty"),
    ("completions", {"model": MODEL, "prompt": ["a", ""]}, 400, "prompt", "prompt 1 is empty"),  # which one
    ("completions", {"model": MODEL, "prompt": [[5], [7, 10**6]]}, 400, "prompt", "prompt 1: token id 1000000 is"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature", "greater than"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p", "less than or equal"),
    ("completions", {"model": MODEL, "prompt": "x", "top_k": -2}, 400, "top_k", "greater than or equal"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n", "greater than or equal"),
    ("completions", {"model": MODEL, "prompt": ["x", "y"], "n": 10**4}, 400, "n", "20000 sequences (prompts times n)"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": ""}, 400, "stop", "stop: stop strings must be non-empty"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": list("abcde")}, 400, "stop",
     "stop: at most 4 stop strings (5 given), got ['a',"),
    ("completions", {"model": MODEL}, 400, "prompt", "required"),
    # a field whose name starts like a union alternative's tag ("str") was not named
    ("completions", {"model": MODEL, "prompt": "x", "stream": "maybe"}, 400, "stream", "valid boolean"),
    ("completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": "maybe"}}, 400,
     "stream_options.include_usage", "valid boolean"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": [1]}, 400, "stop", "valid string"),
    ("completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "needs stream: true"),
    ("completions", {"model": None, "prompt": "x"}, 400, "model", "valid string"),  # null is no default here
    ("completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty",
     "less than or equal to 2"),
    ("completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty",
     "greater than 0"),
    ("completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 200}}, 400, "logit_bias", "[-100, 100]"),
    ("completions", {"model": MODEL, "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids"),
    ("completions", {"model": MODEL, "prompt": "x", "logit_bias": {"1000000": 1}}, 400, "logit_bias", "outside the vocab"),
    ("completions", {"model": MODEL, "prompt": "x", "min_tokens": -1}, 400, "min_tokens", "greater than or equal"),
    ("completions", {"model": MODEL, "prompt": "x", "min_p": 1.5}, 400, "min_p", "less than or equal to 1"),
    ("completions", {"model": MODEL, "prompt": "x", "use_beam_search": True}, 400, "use_beam_search",
     "not supported"),
    ("completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [5, 10**6]}, 400, "stop_token_ids",
     "outside the vocab"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 1}, 400,
     "top_logprobs", "needs logprobs: true"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                          "top_logprobs": 21}, 400, "top_logprobs", "less than or equal to 20"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role", "system"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a" * 130}]}, 400, "messages",
     "context length"),
]


@pytest.mark.parametrize("path,body,status,param,message", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_4xx_naming_the_field(server, path, body, status, param, message):
    raw = isinstance(body, bytes)
    kw = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
    r = httpx.post(f"{server}/v1/{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and message in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert "Traceback" not in err["message"] and "request '" not in err["message"] and len(err["message"]) < 300
    assert err["message"].count(", got ") <= 1, err  # the value named once


def test_attn_density_field(server, loaded):
    """A dense server refuses polar_attn_density; a sparse one serves dense and sparse requests side by side:
    density 1 gives the dense model's tokens, no field gives the sparsity config's (oracle, 1 of 2 KV heads)."""
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "polar_attn_density": 0.5,
                                                     "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and "not supported by this engine" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "polar_attn_density"
    cfg, params, tokenizer = loaded
    sp = SparsityConfig(attn="oracle", attn_density=0.5)
    engine = LLMEngine(cfg, params, tokenizer, progress=False, sparsity=sp, per_request_density=True, **ENGINE_KW)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = "the quick brown fox"
    want = {name: LLM(loaded, sparsity=cfg_sp, progress=False, **ENGINE_KW).generate([prompt], greedy,
                                                                                      use_tqdm=False)[0].text
            for name, cfg_sp in (("dense", None), ("sparse", sp))}
    assert want["dense"] != want["sparse"], "the planted case must tell dense from sparse"
    with serving(engine) as url:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = {}
        for name, extra in (("dense", {"polar_attn_density": 1.0}), ("sparse", {})):
            r = httpx.post(f"{url}/v1/completions", json=body | extra, timeout=60)
            assert r.status_code == 200, r.text
            got[name] = r.json()["choices"][0]["text"]
        r = httpx.post(f"{url}/v1/completions", json=body | {"polar_attn_density": 1.5}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "polar_attn_density"
    assert got == want


def test_server_answers_after_bad_input(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=3).usage.completion_tokens <= 3
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_what_sdks_send_by_default_is_accepted(client, offline, loaded):
    """The no-op values of fields the server does not implement (an empty logit_bias, a text
    response_format), a negative seed (taken mod 2**32, as offline) and a huge top_k (every token) answer
    as if left out."""
    kw = dict(model=MODEL, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    got = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], logit_bias={},
                                         response_format={"type": "text"}, seed=-1, **kw)
    want = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], seed=2**32 - 1, **kw)
    assert got.choices[0].message.content == want.choices[0].message.content
    kw["extra_body"] = {"ignore_eos": True, "top_k": 2**40}
    got = client.completions.create(prompt="the fox", seed=3, **kw).choices[0].text
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    assert got == offline_one(offline, "the fox", sp).text


def test_null_fields_take_their_defaults(server):
    """OpenAI's optional fields are nullable and clients send null for what they leave unset: "temperature":
    null (or n, top_p, top_k, echo, stream, ignore_eos, chat's logprobs) got 400 instead of the default."""
    base = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    fields = {"completions": ({"prompt": "the fox"}, ["temperature", "top_p", "top_k", "n", "stream", "echo",
                                                      "ignore_eos", "seed", "stop", "logprobs", "stream_options"]),
              "chat/completions": ({"messages": [{"role": "user", "content": "hi"}]},
                                   ["temperature", "top_p", "n", "stream", "logprobs", "top_logprobs",
                                    "max_completion_tokens"])}
    for path, (prompt, names) in fields.items():
        want = httpx.post(f"{server}/v1/{path}", json=base | prompt, timeout=30).json()["choices"][0]
        for name in names:
            r = httpx.post(f"{server}/v1/{path}", json=base | prompt | {name: None}, timeout=30)
            assert r.status_code == 200, (path, name, r.text)
            if name != "temperature":  # greedy, so the answer is the one without the field
                got = r.json()["choices"][0]
                assert got.get("text", got.get("message")) == want.get("text", want.get("message")), (path, name)


def test_requests_ended_by_shutdown_get_an_error_event_or_503_and_the_engine_goes_on(served):
    """What a shutdown ends before it finished (AsyncEngine.end_all, which DrainingServer calls before uvicorn
    would cancel the request's task): a stream gets an error event, then [DONE]; a whole request a 503."""
    url, _ = served
    async_engine = APPS[url].state.async_engine
    long = {"model": MODEL, "prompt": "x", "max_tokens": 100, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/v1/completions", json=long | {"stream": True}) as r:
            lines = r.iter_lines()
            assert next(x for x in lines if x.startswith("data: ")).startswith('data: {"id"')
            async_engine.end_all()
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and len(rest) < 99, rest[-3:]
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "shutting down" in error["message"]
        whole = {}
        thread = threading.Thread(target=lambda: whole.update(r=c.post(f"{url}/v1/completions", json=long)))
        thread.start()
        wait_until(lambda: metrics(url)["polar_requests_running"] == 1, 30, "the request to run")
        async_engine.end_all()
        thread.join(60)
        assert whole["r"].status_code == 503 and "shutting down" in whole["r"].json()["error"]["message"]
        assert c.post(f"{url}/v1/completions", json=long | {"max_tokens": 3}).json()["usage"]["completion_tokens"] == 3
    assert metrics(url)["polar_kv_pages_free"] == USABLE_PAGES


def test_draining_server_ends_requests_just_before_uvicorn_would_cancel_them(monkeypatch):
    ended = []
    app = types.SimpleNamespace(state=types.SimpleNamespace(
        async_engine=types.SimpleNamespace(end_all=lambda: ended.append(time.monotonic()))))
    for timeout, delay in ((3.0, 2.0), (0.4, 0.2), (0.0, 0.0)):
        ended.clear()
        srv = DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=timeout))
        t0 = time.monotonic()
        srv.handle_exit(signal.SIGTERM, None)
        srv.handle_exit(signal.SIGTERM, None)  # a second signal schedules nothing more
        wait_until(lambda: ended, 10, "end_all")
        time.sleep(0.1)
        assert srv.should_exit and len(ended) == 1 and delay <= ended[0] - t0 < delay + 0.5, (timeout, ended[0] - t0)
    srv = DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=None))  # uvicorn waits for all: so do we
    srv.handle_exit(signal.SIGTERM, None)
    time.sleep(0.2)
    assert not ended[1:] and srv._drain is None


def test_engine_failure_fails_its_requests_not_the_server(served, client, monkeypatch):
    url, engine = served
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device fault")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)  # the engine thread looks the method up every step
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 4}, timeout=30)
    assert r.status_code == 500 and "injected device fault" in r.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="abc", max_tokens=4,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 4
    m = metrics(url)
    assert m["polar_kv_pages_free"] == USABLE_PAGES and httpx.get(f"{url}/health").status_code == 200


# ---------------------------------------------------------------------------------------------------
# cancellation

def test_disconnect_mid_stream_frees_pages(server):
    before = metrics(server)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{server}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        events = [line for _, line in zip(range(6), (x for x in lines if x.startswith("data: ")))]
        assert len(events) == 6
        during = metrics(server)
    # The response is closed here, in the middle of 120 tokens.
    assert during["polar_kv_pages_used"] > 0
    wait_until(lambda: metrics(server)["polar_kv_pages_free"] == USABLE_PAGES, 20, "the pages to come back")
    after = metrics(server)
    assert after["polar_kv_pages_used"] == 0 and after["polar_requests_running"] == 0
    key = 'polar_requests_finished_total{reason="abort"}'
    assert after.get(key, 0) == before.get(key, 0) + 1, "the request was not aborted"
    assert after["polar_generation_tokens_total"] - before["polar_generation_tokens_total"] < 120


@pytest.mark.parametrize("path,body", [("completions", {"prompt": "Hello"}),
                                       ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_disconnect_while_tokens_keep_coming_cancels_a_whole_answer(served, monkeypatch, path, body):
    """A client that gave up on a non-streamed answer was asked about only when no token had come for
    _DISCONNECT_POLL_S: with tokens every 50 ms (any busy server) the request ran on to max_tokens."""
    url, engine = served
    real_step = engine.step

    def slow_step():  # a token every 50 ms: never a quiet 0.5 s
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)  # the engine thread looks the method up every step
    before = metrics(url)
    body = {"model": MODEL, "max_tokens": 100, "ignore_eos": True} | body  # 100 steps: 5 s and more
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/{path}", json=body, timeout=1.0)  # hangs up after 1 s
    key = 'polar_requests_finished_total{reason="abort"}'
    wait_until(lambda: metrics(url).get(key, 0) == before.get(key, 0) + 1, 3, "the request to be aborted")
    wait_until(lambda: metrics(url)["polar_kv_pages_free"] == USABLE_PAGES, 10, "the pages to come back")
    assert metrics(url)["polar_generation_tokens_total"] - before["polar_generation_tokens_total"] < 100


# ---------------------------------------------------------------------------------------------------
# a real `polar serve` process

def _start(model_dir, port, *flags):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "polar_jax.server", "serve", "--model", str(model_dir), "--port", str(port),
           "--quiet", "--log-level", "warning", *flags]
    for k, v in ENGINE_KW.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_real_server_key_queue_bench_and_sigterm(model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(model_dir, port, "--api-key", "s3cret", "--max-queue", "0", "--shutdown-timeout", "20")
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 180, "`polar serve` to come up")
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        assert httpx.post(f"{url}/v1/completions", content=b"{not json").status_code == 401  # the key comes first
        assert httpx.get(f"{url}/metrics").status_code == 200  # scrapers need no key
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert keyed.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()

        # `polar bench serve` with the key: a complete report.
        out = tmp_path / "bench.json"
        rc = server_cli(["bench", "serve", "--url", url, "--api-key", "s3cret", "--num-prompts", "12",
                         "--sweep", "20,inf", "--input-len", "8", "--output-len", "6", "--label", "dense",
                         "--out", str(out), "--plot", str(tmp_path / "curve.png")])
        assert rc == 0
        report = json.loads(out.read_text())
        assert [r["request_rate"] for r in report["runs"]] == [20.0, "inf"]
        for run in report["runs"]:
            assert run["completed"] == 12 and run["failed"] == 0 and run["output_tokens"] == 12 * 6
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                assert all(np.isfinite(v) and v >= 0 for v in run[key].values()), key
            assert run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"] and run["output_throughput"] > 0
        assert (tmp_path / "curve.png").stat().st_size > 1000
        # A dataset file (token ids and text, own lengths), at most 2 in flight; then both reports on one plot.
        data = tmp_path / "prompts.jsonl"
        data.write_text('{"prompt": [5, 6, 7, 8], "max_tokens": 3}\n{"prompt": "hello there", "max_tokens": 5}\n')
        rc = server_cli(["bench", "serve", "--url", url, "--api-key", "s3cret", "--num-prompts", "4",
                         "--dataset", str(data), "--max-concurrency", "2", "--request-rate", "inf",
                         "--label", "file", "--out", str(tmp_path / "file.json")])
        run = json.loads((tmp_path / "file.json").read_text())["runs"][0]
        assert rc == 0 and run["completed"] == 4 and run["output_tokens"] == 3 + 5 + 3 + 5
        assert run["prompt_tokens"] == 4 + 11 + 4 + 11 and run["max_concurrency"] == 2
        assert server_cli(["bench", "plot", str(out), str(tmp_path / "file.json"), "--out",
                           str(tmp_path / "both.png")]) == 0
        assert (tmp_path / "both.png").stat().st_size > 1000

        # max-queue 0: max_num_seqs requests in flight fill the server; one more gets 429.
        headers = {"Authorization": "Bearer s3cret"}
        long = {"model": MODEL, "prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60, headers=headers) as c:
            streams = [c.stream("POST", f"{url}/v1/completions", json=long) for _ in range(ENGINE_KW["max_num_seqs"])]
            opened = [s.__enter__() for s in streams]
            try:
                assert all(r.status_code == 200 for r in opened)
                r = c.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
            finally:
                for s in streams:
                    s.__exit__(None, None, None)

        # SIGTERM with a request in flight: it finishes, then the process exits cleanly.
        with httpx.Client(timeout=60, headers=headers) as c, c.stream(
                "POST", f"{url}/v1/completions", json=long | {"max_tokens": 60}) as r:
            lines = r.iter_lines()
            first = next(x for x in lines if x.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x.startswith("data: ")]
        texts = [json.loads(x[6:])["choices"][0]["text"] for x in [first] + rest[:-1]]
        assert rest[-1] == "data: [DONE]" and len(texts) == 60
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("flag,value,message", [
    ("--max-queue", "-1", "must be an integer >= 0, got -1"),
    ("--max-num-seqs", "0", "must be a positive integer, got 0"),
    ("--num-pages", "99999999999999999999", "must be at most 2147483647"),  # was an OverflowError traceback
    ("--kv-memory-fraction", "2", "must lie in (0, 1], got 2"),
    ("--shutdown-timeout", "-5", "must be a number >= 0, got -5"),
])
def test_bad_serve_flags_are_refused_before_the_model_loads(tmp_path, capsys, flag, value, message):
    """At parse time, naming the flag: --max-queue -1 was refused only after every program had compiled."""
    with pytest.raises(SystemExit) as e:
        server_cli(["serve", "--model", str(tmp_path / "not-loaded"), flag, value])
    assert e.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_bench_random_dataset_draws_like_the_engine_benchmarks_workload():
    """`--dataset random` draws what benchmarks/serve_offline.py's workload() draws (its three lines, here)."""
    from polar_jax.server.bench import parse_range, random_tokens

    rng = np.random.default_rng(3)
    p_len, o_len = rng.integers(5, 41, 20), rng.integers(2, 10, 20)
    prompts = [rng.integers(3, 1000, p).tolist() for p in p_len]
    items = random_tokens(20, parse_range("5:40", "--input-len"), parse_range("2:9", "--output-len"), 1000, 3)
    assert [i.prompt for i in items] == prompts and [i.max_tokens for i in items] == o_len.tolist()
    assert len({len(i.prompt) for i in items}) > 5
    with pytest.raises(ValueError, match="--output-len"):
        parse_range("9:2", "--output-len")


def _bench_args(*extra):
    import argparse

    from polar_jax.server.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    return parser.parse_args(["bench", "serve", "--url", "http://127.0.0.1:9", "--num-prompts", "1",
                              "--input-len", "4", "--output-len", "2", *extra])


def test_bench_serve_writes_out_into_a_new_folder_and_checks_outputs_first(tmp_path, monkeypatch):
    """--out / --plot in a folder that does not exist yet are written (the folder made), not lost after the
    run; an --out or --plot that cannot be written, or a --compare report that is missing, is refused before
    any request leaves."""
    from polar_jax.server import bench

    calls = []

    async def fake_run(url, items, rate, *args):
        calls.append(rate)
        return [bench.Result(ok=True, prompt_tokens=4, output_tokens=2, ttft=0.1, e2e=0.2, itl=[0.1])], 0.5

    monkeypatch.setattr(bench, "run", fake_run)
    out, png = tmp_path / "new" / "sub" / "dense.json", tmp_path / "plots" / "lat.png"
    args = _bench_args("--out", str(out), "--plot", str(png))
    bench.bench_serve(args)
    assert json.loads(out.read_text())["runs"][0]["completed"] == 1 and png.is_file()
    (tmp_path / "afile").write_text("")
    for extra, error, message in [
        (["--out", str(tmp_path / "afile" / "r.json")], NotADirectoryError, "afile is a file"),
        (["--plot", str(tmp_path / "new")], IsADirectoryError, "it is a directory"),
        (["--plot", str(tmp_path / "lat.xyz")], ValueError, "matplotlib cannot write .xyz plots"),
        (["--plot", str(png), "--compare", str(tmp_path / "missing.json")], FileNotFoundError,
         "--compare: no report .*missing.json"),
    ]:
        calls.clear()
        with pytest.raises(error, match=message):
            bench.bench_serve(_bench_args(*extra))
        assert calls == []  # refused before the benchmark ran
    # `polar bench plot` of that report into a new folder; a file that is no report is named
    plot_args = _bench_args()
    plot_args.results, plot_args.out = [str(out)], str(tmp_path / "more" / "both.png")
    bench.bench_plot(plot_args)
    assert (tmp_path / "more" / "both.png").is_file()
    plot_args.results = [str(tmp_path / "afile")]
    with pytest.raises(ValueError, match="afile is not a report of `polar bench serve`"):
        bench.bench_plot(plot_args)


def test_bench_serve_that_fails_writing_keeps_the_old_report_and_plot(tmp_path, monkeypatch):
    """A report or plot whose writing fails halfway (a full disk, an interrupt) leaves the files of the run
    before whole, not half of a new one."""
    import matplotlib.figure

    from polar_jax.server import bench

    async def fake_run(url, items, rate, *args):
        return [bench.Result(ok=True, prompt_tokens=4, output_tokens=2, ttft=0.1, e2e=0.2, itl=[0.1])], 0.5

    def savefig_half(self, fname, **kw):
        with open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else contextlib.nullcontext(fname) as f:
            f.write(b"half a plot")
        raise OSError("No space left on device")

    monkeypatch.setattr(bench, "run", fake_run)
    out, png = tmp_path / "dense.json", tmp_path / "lat.png"
    out.write_text('{"runs": []}')
    png.write_bytes(b"the old plot")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_half)
    with pytest.raises(OSError, match="No space left"):
        bench.bench_serve(_bench_args("--out", str(out), "--plot", str(png)))
    assert png.read_bytes() == b"the old plot" and json.loads(out.read_text())["runs"][0]["completed"] == 1

    def interrupted(*a, **kw):  # the moment between writing the new report and putting it in place
        raise KeyboardInterrupt

    out.write_text('{"runs": []}')
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.bench_serve(_bench_args("--out", str(out)))
    assert out.read_text() == '{"runs": []}' and sorted(p.name for p in tmp_path.iterdir()) == ["dense.json", "lat.png"]


def test_serve_flags_reach_the_engine(model_dir, tmp_path):
    """`polar serve --batch-invariant --max-num-batched-tokens N` builds an engine in that mode with that
    budget; with a sparse config the engine refuses, naming the conflict."""
    import argparse

    from polar_jax.server.cli import add_commands, build_engine

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    base = ["serve", "--model", str(model_dir), "--quiet", "--max-num-seqs", "4", "--num-pages", "20",
            "--max-model-len", "64"]
    engine, _, _ = build_engine(parser.parse_args(base + ["--batch-invariant", "--max-num-batched-tokens", "96"]))
    assert engine.runner.batch_invariant and engine.config.max_num_batched_tokens == 96
    assert engine.runner.buckets.prefill == (96,)
    engine, _, _ = build_engine(parser.parse_args(base))
    assert not engine.runner.batch_invariant
    sp = tmp_path / "sp.json"
    SparsityConfig(attn="random", attn_density=0.5).to_json(sp)
    with pytest.raises(ValueError, match="batch_invariant=True runs decode rows"):
        build_engine(parser.parse_args(base + ["--batch-invariant", "--sparsity", str(sp)]))


def test_streamed_text_offsets_run_on_across_chunks(client):
    kw = dict(model=MODEL, prompt="the fox", max_tokens=6, logprobs=1, temperature=0, extra_body={"ignore_eos": True})
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert len(chunks) > 1
    tokens = [x for c in chunks for x in c.logprobs.tokens]
    offsets = [x for c in chunks for x in c.logprobs.text_offset]
    assert offsets == np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
    assert offsets == client.completions.create(**kw).choices[0].logprobs.text_offset

def _offline_tops(offline, loaded, ids, sp: SamplingParams) -> tuple[list, list]:
    """The offline engine's answer to the same request: its tokens, each as (text, logprob, bytes) as the
    server spells a token, and at each position the engine's most likely tokens spelled so."""
    from polar_jax.server.token_bytes import TokenBytes

    tb = TokenBytes(loaded[2])
    out = offline_one(offline, ids, sp)
    spell = lambda t, lp: (tb.token_str(t), lp, list(tb.bytes_of(t)))  # noqa: E731
    return ([spell(t, lp) for t, lp in zip(out.token_ids, out.logprobs)],
            [[spell(t, lp) for t, lp in top] for top in out.top_logprobs])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("logprobs", [0, 1, 4])
def test_logprobs_name_the_most_likely_tokens_at_every_generated_position(client, offline, loaded, logprobs, stream):
    """logprobs N without echo: top_logprobs holds {token: logprob} of the N most likely tokens and of the
    token itself at each generated token (OpenAI's "up to logprobs + 1"; it was null, then the top-1 only): the
    offline engine's for the same seeded request, sampled at temperature 1 so that the token is not always
    the most likely one."""
    prompt = "the fox"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, logprobs=logprobs, temperature=1.0, seed=3,
              extra_body={"ignore_eos": True})
    if stream:
        chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
        tokens, lps, top = ([x for c in chunks for x in getattr(c, field)]
                            for field in ("tokens", "token_logprobs", "top_logprobs"))
    else:
        got = client.completions.create(**kw).choices[0].logprobs
        tokens, lps, top = got.tokens, got.token_logprobs, got.top_logprobs
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, logprobs=4)
    want, want_top = _offline_tops(offline, loaded, loaded[2].encode(prompt), sp)
    assert list(zip(tokens, lps)) == [w[:2] for w in want]
    assert top == [{t: lp for t, lp, _ in [*wt[:logprobs], w]} for w, wt in zip(want, want_top)]
    assert any(w != wt[0] for w, wt in zip(want, want_top))  # some sampled token is not the most likely one


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("top_logprobs", [None, 1, 5])
def test_chat_top_logprobs_name_the_most_likely_tokens(client, offline, loaded, top_logprobs, stream):
    """Chat's top_logprobs N (refused above 1 before): at each generated token the N most likely ones with
    their logprobs and bytes, most likely first, the offline engine's for the same seeded request, sampled at
    temperature 1 so that they are not always led by the token itself (top_logprobs without logprobs: the
    bad-input table)."""
    messages = [{"role": "user", "content": "Count: one, two"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=5, temperature=1.0, seed=4, logprobs=True,
              **({} if top_logprobs is None else {"top_logprobs": top_logprobs}))
    if stream:
        content = [x for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                   for x in c.choices[0].logprobs.content]
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    ids = list(loaded[2].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    want, want_top = _offline_tops(offline, loaded, ids, SamplingParams(temperature=1.0, seed=4, max_tokens=5,
                                                                        logprobs=5))
    assert [(x.token, x.logprob, x.bytes) for x in content] == want
    n = top_logprobs or 0
    assert [[(t.token, t.logprob, t.bytes) for t in x.top_logprobs] for x in content] == [wt[:n] for wt in want_top]
    assert any(w != wt[0] for w, wt in zip(want, want_top))  # some sampled token is not the most likely one


def test_token_bytes_and_text_offsets_follow_characters_split_across_tokens():
    """Byte-level BPE splits an emoji into one token per byte: each token's `bytes` are its own (not those of
    U+FFFD, which decoding it alone gives), they join into the text's UTF-8, and each text_offset is where
    the token's character starts in the text, carried across calls as a stream's chunks carry it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from polar_jax.server.token_bytes import TextOffsets, TokenBytes

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    byte_level = TokenBytes(transformers.PreTrainedTokenizerFast(tokenizer_object=tok))
    assert byte_level.byte_level
    text = "a\U0001f389 \u00e9!"
    ids = tok.encode(text).ids
    pieces = [byte_level.bytes_of(i) for i in ids]
    assert len(ids) == 9 and b"".join(pieces) == text.encode() and pieces[1:5] == [bytes([b]) for b in "\U0001f389".encode()]
    want = [0, 1, 1, 1, 1, 2, 3, 3, 4]  # a, the emoji's 4 bytes, space, e-acute's 2 bytes, !
    assert TextOffsets(byte_level).offsets(ids) == want
    where = TextOffsets(byte_level)
    assert where.offsets(ids[:3]) + where.offsets(ids[3:]) == want
    # SentencePiece's byte fallback and word pieces.
    sp = Tokenizer(models.WordLevel({"<unk>": 0, "<0xF0>": 1, "\u2581hi": 2}, unk_token="<unk>"))
    sp_bytes = TokenBytes(transformers.PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>"))
    assert not sp_bytes.byte_level and sp_bytes.bytes_of(1) == b"\xf0" and sp_bytes.bytes_of(2) == b" hi"


def test_sentencepiece_tokens_keep_their_space_and_special_tokens_take_no_room():
    """A SentencePiece tokenizer (LLaMA-2, Mistral) drops a word piece's leading space when the piece is
    decoded alone and at the start of a text, and every tokenizer's decode skips special tokens (an OPT or
    LLaMA-2 prompt's BOS): logprobs named "▁the" as "the", and an echoed prompt's text_offset counted
    the BOS's characters and the dropped space, so text[offset:] did not start with the token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from polar_jax.server.token_bytes import TextOffsets, TokenBytes

    vocab = {"<unk>": 0, "<s>": 1, "\u2581Hello": 2, "\u2581world": 3, "\u2581the": 4, "\u2581fox": 5, "!": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    tb = TokenBytes(hf)
    assert tb.strips_first_space and not tb.byte_level
    ids = [1, 4, 5, 6, 3]  # <s> the fox! world
    text = hf.decode(ids, skip_special_tokens=True)
    assert text == "the fox! world"
    assert [tb.token_str(i) for i in ids] == ["<s>", " the", " fox", "!", " world"]
    offsets = TextOffsets(tb, decoded_start=True).offsets(ids)  # an echoed prompt: text starts with its decoding
    assert offsets == [0, 0, 3, 7, 8]
    for i, at in zip(ids[1:], offsets[1:]):
        assert text[at:].startswith(tb.token_str(i).lstrip(" ") if at == 0 else tb.token_str(i))
    # Generated text (no echo) keeps the first token's space: only an echoed prompt's start is decoded alone.
    assert TextOffsets(tb).offsets([4, 5]) == [0, 4]
    # skip_special_tokens False: the text keeps the BOS, and the offsets count it.
    kept = hf.decode(ids, skip_special_tokens=False)
    offsets = TextOffsets(tb, decoded_start=True, skip_special_tokens=False).offsets(ids)
    assert kept == "<s> the fox! world" and offsets == [0, 3, 7, 11, 12]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stop_token_ids_end_generation_over_http(client, offline, loaded, endpoint):
    """vLLM's stop_token_ids was accepted and silently ignored (the offline API honours it). The stop token's
    text was then kept in the text: as vLLM's, it is not, unless include_stop_str_in_output (whole or streamed).
    The choice's stop_reason (vLLM's) names the stop token, in the last chunk of a stream."""
    tok = loaded[2]
    if endpoint == "chat":
        messages = [{"role": "user", "content": "the fox"}]
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        create = partial(client.chat.completions.create, messages=messages)
        text, delta = lambda c: c.message.content, lambda c: c.delta.content or ""
    else:
        ids = tok.encode("the fox")
        create, text, delta = partial(client.completions.create, prompt=ids), lambda c: c.text, lambda c: c.text
    free = offline_one(offline, ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).token_ids
    has_text = [bool(tok.decode([t], skip_special_tokens=True)) for t in free]
    j = max(i for i in range(len(free) - 1) if free[i] not in free[:i] and has_text[i])
    assert j > 0  # free[j] has text and first appears at j, before the last token
    for keep in (False, True):
        want = tok.decode(free[:j + keep], skip_special_tokens=True)
        kw = dict(model=MODEL, max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True, "stop_token_ids": [free[j]], "include_stop_str_in_output": keep})
        whole = create(**kw).choices[0]
        assert (text(whole), whole.finish_reason, whole.stop_reason) == (want, "stop", free[j])
        chunks = [c.choices[0] for c in create(stream=True, **kw)]
        assert ("".join(map(delta, chunks)), chunks[-1].finish_reason) == (want, "stop")
        assert [c.stop_reason for c in chunks] == [None] * (len(chunks) - 1) + [free[j]]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_penalties_and_min_p_reach_the_engine(client, offline, loaded, endpoint):
    """OpenAI's presence / frequency penalties and vLLM's repetition_penalty and min_p (refused before) give
    what the offline engine gives for the same request, and change the greedy answer."""
    pen = dict(presence_penalty=0.6, frequency_penalty=1.2, repetition_penalty=1.5)
    kw = dict(model=MODEL, max_tokens=10, temperature=0)
    if endpoint == "chat":
        messages = [{"role": "user", "content": "Count: one, two"}]
        ids = list(loaded[2].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        ask = lambda **k: client.chat.completions.create(messages=messages, **k).choices[0].message.content  # noqa: E731
    else:
        ids = loaded[2].encode("the fox the fox the fox")
        ask = lambda **k: client.completions.create(prompt=ids, **k).choices[0].text  # noqa: E731
    got = ask(**kw, presence_penalty=pen["presence_penalty"], frequency_penalty=pen["frequency_penalty"],
              extra_body={"repetition_penalty": pen["repetition_penalty"], "ignore_eos": True})
    want = offline_one(offline, ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, **pen))
    plain = offline_one(offline, ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert got == want.text and want.token_ids != plain.token_ids
    sampled = ask(**{**kw, "temperature": 1.0}, seed=3, extra_body={"min_p": 0.4, "ignore_eos": True})
    assert sampled == offline_one(offline, ids, SamplingParams(temperature=1.0, seed=3, min_p=0.4, max_tokens=10,
                                                               ignore_eos=True)).text


def test_include_stop_str_in_output_keeps_the_stop_string(client):
    """vLLM's include_stop_str_in_output (refused before): the text ends with the stop string that ended it,
    which the choice's stop_reason names."""
    kw = dict(model=MODEL, prompt="the fox", max_tokens=12, temperature=0)
    free = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    assert len(free) >= 6
    stop = free[4:6]
    got = client.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True,
                                                                   "include_stop_str_in_output": True}).choices[0]
    assert got.text == free[:free.index(stop) + len(stop)] and (got.finish_reason, got.stop_reason) == ("stop", stop)


def test_logit_bias_and_min_tokens_reach_the_engine(client, offline, loaded):
    """OpenAI's logit_bias (string token ids) and vLLM's min_tokens (refused before) give what the offline
    engine gives for the same request: a token pushed up by 100 is chosen at every step; with EOS pushed up,
    min_tokens keeps the request going until it has that many tokens."""
    ids = loaded[2].encode("the fox")
    t = loaded[2].encode("x", add_special_tokens=False)[0]
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logit_bias={str(t): 100},
                                    extra_body={"ignore_eos": True}).choices[0]
    assert got.text == "x" * 5
    eos = loaded[0].eos_token_ids[0]
    kw = dict(model=MODEL, prompt=ids, max_tokens=8, temperature=0, logit_bias={str(eos): 100})
    on_eos = client.completions.create(**kw).choices[0]
    assert (on_eos.finish_reason, on_eos.stop_reason) == ("stop", None)  # vLLM's: None for the model's EOS
    got = client.completions.create(**kw, extra_body={"min_tokens": 3}).choices[0]
    want = offline_one(offline, ids, SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100}, min_tokens=3))
    assert (got.text, got.finish_reason) == (want.text, "stop") and len(want.token_ids) == 4


def test_preemptions_are_counted_in_metrics():
    """polar_preemptions_total follows the scheduler's count (a pool that thrashes shows in /metrics)."""
    from polar_jax.server.metrics import ServerMetrics

    m = ServerMetrics("tiny")
    bm = types.SimpleNamespace(num_free_pages=3, num_usable_pages=7)
    sched = types.SimpleNamespace(block_manager=bm, num_running=1, num_waiting=2, num_preemptions=0)
    for total in (0, 2, 2, 5):
        sched.num_preemptions = total
        m.set_engine_state(sched)
        assert b"polar_preemptions_total %.1f" % total in m.render()


def test_sparsity_metrics_describe_the_selecting_layers_and_calibrated_tables():
    """polar_attn_density read 0.625 for a calibrated 0.5 config (it averaged in the dense layer 0), and a
    calibrated k table showed as mlp_k="None"."""
    from polar_jax.server.metrics import ServerMetrics

    sp = SparsityConfig(attn="router", attn_density=(1.0, 0.5, 0.5, 0.5), mlp="router",
                        mlp_k_table=((1, (512, 384)), (8, (512, 256))))
    m = ServerMetrics("m", sp, CFG.replace(n_layers=4))
    assert m.registry.get_sample_value("polar_attn_density") == 0.5
    info = {s.labels["mlp_k"] for s in m.registry.collect() for s in s.samples if s.name == "polar_sparsity_info"}
    assert info == {"{1: [512, 384], 8: [512, 256]}"}


def test_attn_density_metric_is_the_fraction_of_whole_heads_kept(loaded):
    """polar_attn_density showed the requested density, but a layer keeps whole KV heads (rounded half up):
    0.3 of 2 heads keeps 1, half of them; per layer (layer 0 dense), 1 and 2 of 2 heads average 0.75."""
    from fastapi.testclient import TestClient

    cfg, params, tokenizer = loaded
    engine = LLMEngine(cfg, params, tokenizer, compile=False, progress=False, **ENGINE_KW)
    assert cfg.n_kv_heads == 2
    for density, kept in ((0.3, 0.5), ((1.0, 0.3, 0.8), 0.75)):
        app = build_app(engine, MODEL, sparsity=SparsityConfig(attn="random", attn_density=density))
        lines = TestClient(app).get("/metrics").text.splitlines()  # no lifespan: the engine thread stays off
        assert [float(l.split()[1]) for l in lines if l.startswith("polar_attn_density ")] == [kept], density
