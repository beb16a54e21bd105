"""The `polar` command line in-process: generate on a tiny random model, bad flags and paths fail fast with
one line, the output printer, the demo's model folder."""

import io
import json
import shutil
import string
import types
from pathlib import Path

import jax.numpy as jnp
import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from polar_jax import LLM, checkpoint, generate, preset
from polar_jax.cli import main as polar
from polar_jax.cli import print_outputs
from polar_jax.engine.llm_engine import LLMEngine
from polar_jax.engine.model_runner import StepRecord
from tests.test_convert import random_params

CFG = preset("tiny-llama-gqa")  # vocab 103, 64 positions, EOS 2


def char_tokenizer():
    """One token per character (ids 3..72), no chat template: short prompts stay short."""
    chars = string.ascii_letters + string.digits + " .,!?"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A bf16 model directory (the default dtype of `polar convert`) with a tokenizer."""
    tmp = tmp_path_factory.mktemp("cli")
    char_tokenizer().save_pretrained(tmp / "tok")
    return checkpoint.save(tmp / "tiny", CFG, random_params(CFG, jnp.bfloat16), tokenizer_dir=tmp / "tok")


def run(capsys, *argv):
    rc = polar([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_bf16_ragged_batch(model_dir, capsys):
    """bf16 on CPU with prompts of different lengths once crashed in prefill (no bf16 x bf16 -> f32 dot)."""
    prompts = ["Hi", "What is the capital of France?", "Sea"]
    rc, out, err = run(capsys, "generate", "--model", model_dir, *(a for p in prompts for a in ("--prompt", p)),
                       "--max-new-tokens", 7)
    assert rc == 0, err
    cfg, params, tok = checkpoint.load(model_dir)
    assert params["embed"].dtype == jnp.bfloat16
    want = generate(cfg, params, [tok.encode(p) for p in prompts], max_new_tokens=7)
    for i, p in enumerate(prompts):
        text = tok.decode(list(want.tokens[i, : want.lengths[i]]), skip_special_tokens=True).strip()
        assert f"--- [{i}] {p}\n{text}\n" in out
    assert "3 prompts: prefill 35 tokens in" in out and "ms/step" in out and "compile" in out
    assert "3 of 3 prompts done" in err  # progress while decoding


def test_generate_one_prompt_streams(model_dir, capsys):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", 20)
    assert rc == 0, err
    cfg, params, tok = checkpoint.load(model_dir)
    want = generate(cfg, params, [tok.encode("Hello")], max_new_tokens=20)
    text = tok.decode(list(want.tokens[0, : want.lengths[0]]), skip_special_tokens=True)
    assert out.startswith(f"--- [0] Hello\n{text}\n")
    assert "1 prompt: prefill 5 tokens" in out


def test_print_outputs_prints_as_outputs_arrive():
    """The printer consumes an iterator: each piece of text is out before the next output is asked for."""
    out, err = io.StringIO(), io.StringIO()
    words = ["Once", " upon", " a", " time"]
    log = [StepRecord(0, 0, 4, 10, 0.1)] + [StepRecord(1, 5 + i, 0, 0, 0.2) for i in range(3)]
    engine = types.SimpleNamespace(runner=types.SimpleNamespace(log=log), compile_s=1.5)

    def outputs():
        for i, w in enumerate(words):
            if i:
                assert out.getvalue().endswith("".join(words[:i]))  # the previous output's text is already shown
            yield types.SimpleNamespace(request_id="req-0", new_text=w, finished=i == 3, token_ids=[0] * (i + 1),
                                        finish_reason="length" if i == 3 else None, text="".join(words[:i + 1]))

    print_outputs(outputs(), ["a prompt"], engine, out=out, err=err)
    assert out.getvalue().startswith("--- [0] a prompt\nOnce upon a time\n")
    assert "prefill 4 tokens in 0.10 s (40 tokens/s); 4 tokens generated, 3 in decode-only steps: 0.60 s " \
           "(5.0 tokens/s, 3 steps, 200.0 ms/step); compile 1.5 s" in out.getvalue()


@pytest.fixture
def no_weights(monkeypatch):
    """Loading the weights fails the test: every check here must come before it."""
    def load_params(*a, **k):
        raise AssertionError("the weights were loaded before the bad input was noticed")

    monkeypatch.setattr(checkpoint, "load_params", load_params)


@pytest.mark.parametrize("flags, message", [
    (["--attn-density", "1.5"], "--attn-density must lie in (0, 1], got 1.5"),
    (["--attn-density", "nan"], "--attn-density must lie in (0, 1], got nan"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0: got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0: got -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]: got 0.0"),
    (["--top-k", "-3"], "--top-k must be an int >= 0 (0: off): got -3"),
    (["--min-p", "2"], "--min-p must be in [0, 1] (0: off): got 2.0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0 (1: off): got 0.0"),
    (["--presence-penalty", "-3"], "--presence-penalty must be in [-2, 2] (0: off): got -3.0"),
    (["--frequency-penalty", "inf"], "--frequency-penalty must be in [-2, 2] (0: off): got inf"),
    (["--max-new-tokens", "0"], "--max-new-tokens must lie in [1, 2147483647], got 0"),
    (["--max-new-tokens", "99999999999999999999"], "--max-new-tokens must lie in [1, 2147483647]"),  # OverflowError
    (["--prompt", " \t "], "prompt 1 is empty or only whitespace"),
    (["--max-new-tokens", "20000"], "prompt 0 has 2 tokens; with --max-new-tokens 20000 it needs 20002 positions, "
                                    "more than the model's context length of 64"),
    (["--max-new-tokens", "1000000000"], "model's context length of 64"),
    (["--attn-source", "oracle"], "--attn-source needs --attn-density below 1"),  # it ran dense without a word
])
def test_bad_flags_fail_before_the_model_loads(model_dir, capsys, no_weights, flags, message):
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "Hi", *flags)
    assert rc == 2 and out == ""
    assert err.startswith("polar: error: ") and message in err and err.count("\n") == 1, err


def test_a_prompts_file_that_cannot_be_read_is_named(model_dir, tmp_path, capsys, no_weights):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for path, message in ((tmp_path / "latin1.txt", "is not UTF-8 text"), (tmp_path, "is not a file"),
                          (tmp_path / "missing.txt", "prompts file not found")):
        rc, out, err = run(capsys, "generate", "--model", model_dir, "--prompts-file", path)
        assert rc == 2 and message in err and str(path) in err and err.count("\n") == 1, err


def test_a_head_size_decoding_does_not_take_is_named_before_the_weights_load(tmp_path, capsys, no_weights):
    """Such a model converts (with a warning) but cannot run; generating it once failed only after the
    weights had loaded, deep in the attention kernel's trace."""
    char_tokenizer().save_pretrained(tmp_path / "tok")
    cfg = CFG.replace(head_dim=32)
    model = checkpoint.save(tmp_path / "hd32", cfg, random_params(cfg, jnp.float32), tokenizer_dir=tmp_path / "tok")
    rc, out, err = run(capsys, "generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", "4")
    assert rc == 2 and out == ""
    assert err.startswith("polar: error: ") and "head_dim=32; polar's attention kernels support head_dim 64, 80, 96, 128" in err, err
    with pytest.raises(ValueError, match="head_dim=32"):
        LLMEngine(cfg, random_params(cfg, jnp.float32), None, compile=False, progress=False)
    with pytest.raises(ValueError, match="head_dim=32; polar's attention kernels support"):
        LLM(model)  # `polar serve` and lm-eval's model load through the same checkpoint.load
    text = tmp_path / "t.txt"
    text.write_text("Hi there. " * 50)
    for command in (["eval", "ppl", "--text", text], ["collect", "--text", text, "--out", tmp_path / "d"]):
        rc, _, err = run(capsys, *command, "--model", model)  # failed after the weights loaded
        assert rc == 2 and "head_dim=32; polar's attention kernels support" in err and err.count("\n") == 1, err


def test_an_unknown_flag_is_named_with_its_commands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        polar(["generate", "--model", "m", "--prompt", "hi", "--stop", "foo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: polar generate")
    assert "polar generate: error: unrecognized arguments: --stop foo" in err


def test_broken_sparsity_json_names_the_file(model_dir, tmp_path, capsys, no_weights):
    bad = tmp_path / "sparsity.json"
    bad.write_text('{"attn": "random",\n "attn_density": 0.5,,\n}')
    rc, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", "Hi", "--sparsity", bad)
    assert rc == 2 and f"sparsity config {bad} is not valid JSON" in err and "line 2 column 22" in err, err
    bad.write_text('{"attn": "sideways"}')
    rc, _, err = run(capsys, "generate", "--model", model_dir, "--prompt", "Hi", "--sparsity", bad)
    assert rc == 2 and f"bad sparsity config {bad}" in err and "sideways" in err, err


def test_a_sparsity_json_for_another_model_is_named_before_the_weights_load(model_dir, tmp_path, capsys, no_weights):
    """A config of another model's layer count (or layers past this one's) was noticed only once the weights had
    loaded, and the message did not say which file."""
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"attn": "oracle", "attn_density": [1.0] + [0.5] * CFG.n_layers}))
    rc, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "Hi", "--max-new-tokens", "4",
                       "--sparsity", other)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert f"{other}: sparsity attn_density has {CFG.n_layers + 1} per-layer values" in err, err

def test_cache_too_big_for_memory(model_dir, tmp_path, capsys, no_weights):
    """A model with a huge context: 5e8 new tokens pass the context check but not the memory check."""
    big = Path(shutil.copytree(model_dir, tmp_path / "big"))
    (big / "config.json").write_text(json.dumps(CFG.replace(max_positions=2**30).to_dict()))
    rc, out, err = run(capsys, "generate", "--model", big, "--prompt", "Hi", "--max-new-tokens", 500_000_000)
    assert rc == 2 and out == ""
    assert ("the KV cache (1 sequences x 500000002 positions, bfloat16) needs 715.3 GiB (+ 0.0 GiB of weights) "
            "but there is") in err


def test_model_flag_given_a_conversion_source(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for src, what in [(hf, "a transformers (HF) model directory"), (gguf, "a GGUF file")]:
        rc, _, err = run(capsys, "generate", "--model", src, "--prompt", "Hi")
        assert rc == 2
        assert err == (f"polar: error: {src} is {what}, not a polar model directory; make a model directory "
                       f"from it with `polar convert {src} DIR`\n")


def test_convert_output_under_a_file(tmp_path, capsys):
    (tmp_path / "somefile").write_text("x")
    rc, _, err = run(capsys, "convert", tmp_path / "x.gguf", tmp_path / "somefile" / "out")
    assert rc == 2
    assert err == (f"polar: error: cannot create {tmp_path}/somefile/out: {tmp_path}/somefile is a file, "
                   "not a directory\n")


def test_demo_uses_a_per_user_folder(tmp_path, monkeypatch, capsys):
    import convert
    import polar_jax.cli as cli

    seen = {}
    monkeypatch.setenv("POLAR_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(convert, "convert_checkpoint", lambda src, out, dtype: seen.setdefault("out", out))
    monkeypatch.setattr(cli, "default_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(cli, "run_generate", lambda model_dir, prompts, args: seen.setdefault("run", model_dir))
    assert polar(["demo"]) == 0
    assert seen["out"] == seen["run"] == tmp_path / "home" / "models" / "smollm2-135m-instruct-fp32"
    assert not (tmp_path / "models").exists()
    # --model-dir: an empty folder is converted into; one holding something else is named, and left as it is.
    (tmp_path / "empty").mkdir()
    seen.clear()
    assert polar(["demo", "--model-dir", str(tmp_path / "empty")]) == 0 and seen["out"] == tmp_path / "empty"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert polar(["demo", "--model-dir", str(tmp_path / "other")]) == 2
    assert "holds no converted model" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_serve_on_a_busy_port_fails_before_loading(tmp_path, capsys):
    """It loaded and compiled every program (minutes on a GPU) before uvicorn found the port taken."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err = run(capsys, "serve", "--model", tmp_path / "not-loaded", "--port", port)
    assert rc == 2 and err.startswith(f"polar: error: cannot listen on 127.0.0.1:{port}: "), err


@pytest.mark.parametrize("port", [99999, -1])
def test_serve_on_a_port_out_of_range_is_named(tmp_path, capsys, port):
    """A port past 65535 raised an OverflowError traceback from socket.bind."""
    rc, _, err = run(capsys, "serve", "--model", tmp_path / "not-loaded", "--port", port)
    assert rc == 2 and err == f"polar: error: --port must lie in 0..65535, got {port}\n", err


def test_serve_reads_its_sparsity_file_before_the_weights_load(model_dir, tmp_path, capsys, no_weights):
    """A broken or mismatched --sparsity file was read only once the weights had loaded."""
    bad = tmp_path / "sp.json"
    bad.write_text('{"attn": "sideways"}')
    rc, _, err = run(capsys, "serve", "--model", model_dir, "--sparsity", bad, "--port", "0")
    assert rc == 2 and f"bad sparsity config {bad}" in err, err
    bad.write_text(json.dumps({"attn": "oracle", "attn_density": [1.0] + [0.5] * CFG.n_layers}))
    rc, _, err = run(capsys, "serve", "--model", model_dir, "--sparsity", bad, "--port", "0")
    assert rc == 2 and f"{bad}: sparsity attn_density has {CFG.n_layers + 1} per-layer values" in err, err

def test_serve_warns_when_the_tokenizer_outgrows_the_vocabulary(tmp_path, monkeypatch):
    """--random-weights with another model's tokenizer: its ids past the vocabulary decoded to ''."""
    import polar_jax.engine.llm_engine as llm_engine
    from polar_jax.cli import build_parser
    from polar_jax.server.cli import build_engine

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(149)}}  # 150 tokens; tiny-llama has 103
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    monkeypatch.setattr(llm_engine, "LLMEngine", lambda *a, **k: None)  # the check comes before compiling
    args = build_parser().parse_args(["serve", "--random-weights", "--model", "tiny-llama", "--tokenizer",
                                      str(tmp_path / "tok"), "--dtype", "fp32"])
    with pytest.warns(UserWarning, match="the tokenizer has 150 tokens, more than the model's vocabulary of 103"):
        build_engine(args)


def test_sigterm_in_a_forked_worker_ends_it_quietly(capfd):
    """lm-eval's bootstrap pool forks workers and ends them with SIGTERM: they inherit polar's handler, which
    must end them (status 128 + SIGTERM), not print a KeyboardInterrupt traceback from each."""
    import multiprocessing
    import signal
    import time
    import warnings

    from polar_jax.cli import _sigterm_interrupts

    with _sigterm_interrupts(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # os.fork() beside JAX's threads: the worker runs no JAX
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.5)
        worker.terminate()
        worker.join(20)
    assert worker.exitcode == 128 + signal.SIGTERM
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def test_every_flag_of_every_command_has_a_help_string():
    """`polar serve --help` listed --log-level and `polar bench serve --help` --seed with no word on them."""
    import argparse

    from polar_jax.cli import build_parser

    def parsers(p, name):
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    bare = [f"{name} {a.option_strings[-1] if a.option_strings else a.dest}"
            for name, p in parsers(build_parser(), "polar") for a in p._actions
            if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not bare, bare
