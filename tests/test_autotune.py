"""The kernel autotuner (pallas_kernels.autotune): lookup order memo -> user cache -> shipped table ->
heuristic, tuned entries reaching the kernels, bad files, atomic writes, and `polar tune` on CPU.

Every test points the user cache ($POLAR_TUNE_DIR) and the shipped-table folder at fresh temp folders
and starts from an empty memo, so no test sees another's entries (or the developer's own cache).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import autotune
from pallas_kernels.decode_attention import api as attention_api
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.decode_attention import triton as dk
from pallas_kernels.paged_attention import triton as pk
from pallas_kernels.selective_gemm import triton as sk
from polar_jax import preset
from polar_jax.cli import main as polar
from tests.tolerances import assert_close

# An attention shape and its shape class (B 40 -> 48, S 1500 -> 1536).
SHAPE = dict(B=40, N=32, K=8, S=1500, H=128, C=8, dtype=jnp.float16)
CLASS_KEY = "attention|B=48,N=32,K=8,S=1536,H=128,C=8,dtype=float16"
TABLE_CFG = dk.AttentionConfig(block_s=32, splits=4, num_warps=8, num_stages=2)
USER_CFG = dk.AttentionConfig(block_s=16, splits=2, num_warps=2, num_stages=4)


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    """(user cache folder, shipped-table folder), both empty; memo cleared before and after."""
    user, table = tmp_path / "user", tmp_path / "table"
    monkeypatch.setenv("POLAR_TUNE_DIR", str(user))
    monkeypatch.delenv("POLAR_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "TABLE_DIR", table)
    autotune.clear()
    yield user, table
    autotune.clear()


def _write(path, entries, version=autotune.VERSION):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": version, "device": "test", "entries": entries}))


def _entry(cfg):
    return {"config": dataclasses.asdict(cfg), "ms": 1.0, "heuristic_ms": 2.0, "timings": []}


def _device_file(folder):
    return folder / f"{autotune._slug(autotune.device_kind())}.json"


def test_lookup_order_memo_user_table_heuristic(dirs, monkeypatch):
    user, table = dirs
    heuristic = dk.attention_heuristic(**SHAPE)
    assert heuristic not in (TABLE_CFG, USER_CFG)
    calls, real_heuristic = [], dk.attention_heuristic
    monkeypatch.setattr(dk, "attention_heuristic", lambda **kw: calls.append(kw) or heuristic)
    assert dk.attention_config(**SHAPE) == heuristic                      # nothing on disk
    assert dk.attention_config(**{**SHAPE, "B": 41}) == heuristic         # same class: from the memo
    assert len(calls) == 1
    monkeypatch.setattr(dk, "attention_heuristic", real_heuristic)

    _write(_device_file(table), {CLASS_KEY: _entry(TABLE_CFG)})
    assert dk.attention_config(**SHAPE) == heuristic                      # memo still holds the heuristic
    autotune.clear()
    assert dk.attention_config(**SHAPE) == TABLE_CFG                      # shipped table
    assert dk.attention_config(**{**SHAPE, "B": 47, "S": 1536}) == TABLE_CFG   # same class
    other = {**SHAPE, "B": 49}                                            # B 49 -> 64: another class
    assert dk.attention_config(**other) == dk.attention_heuristic(**other)

    _write(_device_file(user), {CLASS_KEY: _entry(USER_CFG)})
    autotune.clear()
    assert dk.attention_config(**SHAPE) == USER_CFG                       # user cache before the table
    # An entry of another kernel with the same dims does not leak across kernels.
    paged = {**SHAPE, "Z": 32}
    assert pk.paged_attention_config(**paged) == pk.paged_attention_heuristic(**paged)


def test_coarse_buckets():
    assert [autotune.coarse(n) for n in (1, 3, 5, 16, 17, 33, 48, 49, 1500, 2048, 11008)] == \
        [1, 3, 6, 16, 24, 48, 48, 64, 1536, 2048, 12288]


def test_table_entry_reaches_the_kernel(dirs, monkeypatch):
    """The config the Pallas kernel is built with is the table's, and the output is still right."""
    _, table = dirs
    B, N, K, S, H = 3, 4, 2, 96, 64
    cfg = dk.AttentionConfig(block_s=16, splits=2, num_warps=2, num_stages=2)
    key = autotune.class_key("attention", dk.attention_bucket(B, N, K, S, H, K, jnp.float32))
    _write(_device_file(table), {key: _entry(cfg)})
    seen = []
    real = dk.pl.pallas_call

    def spy(kernel, *a, **kw):
        if "cfg" in getattr(kernel, "keywords", {}):
            seen.append(kernel.keywords["cfg"])
        return real(kernel, *a, **kw)

    monkeypatch.setattr(dk.pl, "pallas_call", spy)
    ks = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(ks[0], (B, N, H), jnp.float32)
    kc, vc = (jax.random.normal(k, (B, K, S, H), jnp.float32) for k in ks[1:])
    lengths = jnp.array([96, 37, 1], jnp.int32)
    out = attention_api.decode_attention(q, kc, vc, lengths, impl="triton", interpret=True)
    assert seen == [cfg]
    assert_close(out, decode_attention_reference(q, kc, vc, lengths), jnp.float32)


def test_table_entry_reaches_the_selective_gemm(dirs, monkeypatch):
    _, table = dirs
    B, D, F, count = 5, 64, 48, 40
    up = sk.UpConfig(block_b=16, block_n=32, block_k=32, split_k=2, num_warps=4, num_stages=2)
    down = sk.DownConfig(block_b=16, block_n=16, block_d=32, split=2, num_warps=4, num_stages=2)
    assert up != sk.up_heuristic(B, D, count) and down != sk.down_heuristic(B, D, count)
    _write(_device_file(table), {
        autotune.class_key("selective_up", sk.up_bucket(B, D, count, False, jnp.float32)): _entry(up),
        autotune.class_key("selective_down", sk.down_bucket(B, D, count, jnp.float32)): _entry(down)})
    seen = []
    real = sk.pl.pallas_call

    def spy(kernel, *a, **kw):
        seen.append(kernel.keywords["cfg"])
        return real(kernel, *a, **kw)

    monkeypatch.setattr(sk.pl, "pallas_call", spy)
    ks = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(ks[0], (B, D), jnp.float32)
    w = jax.random.normal(ks[1], (1, F, D), jnp.float32)
    idx = jax.random.permutation(ks[2], F)[:count].astype(jnp.int32)
    h = sk.selective_up(x, w, idx, count, activation="none", layer=0, interpret=True)
    y = sk.selective_down(h, w, idx, count, layer=0, interpret=True)
    assert seen == [up, down]
    w_sel = np.asarray(w[0])[np.asarray(idx)]
    np.testing.assert_allclose(h, np.asarray(x) @ w_sel.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, np.asarray(h) @ w_sel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text, says", [("{\"version\": 1, \"entr", "not valid JSON"),
                                        ('{"version": 99, "entries": {}}', "format version 99"),
                                        ("[1, 2]", "format version 'list'")])
def test_bad_cache_file_warns_once_and_falls_back(dirs, text, says):
    user, _ = dirs
    path = _device_file(user)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.warns(UserWarning) as record:
        assert dk.attention_config(**SHAPE) == dk.attention_heuristic(**SHAPE)
        other = {**SHAPE, "B": 100}
        assert dk.attention_config(**other) == dk.attention_heuristic(**other)
    msgs = [str(r.message) for r in record]
    assert len(msgs) == 1 and str(path) in msgs[0] and says in msgs[0], msgs


def test_save_is_atomic_and_merges(dirs, monkeypatch):
    user, _ = dirs
    path = _device_file(user)
    autotune.save(path, "dev", {"a|x=1": _entry(TABLE_CFG)})
    before = path.read_text()
    real_dump = json.dump

    def dump_then_crash(data, f, **kw):
        f.write(json.dumps(data)[:20])   # half a file, then the writer dies
        raise KeyboardInterrupt

    monkeypatch.setattr(autotune.json, "dump", dump_then_crash)
    with pytest.raises(KeyboardInterrupt):
        autotune.save(path, "dev", {"b|x=2": _entry(USER_CFG)})
    assert path.read_text() == before                     # the old file, whole
    assert os.listdir(user) == [path.name]                # no temp file left behind
    monkeypatch.setattr(autotune.json, "dump", real_dump)
    autotune.save(path, "dev", {"b|x=2": _entry(USER_CFG)})
    assert sorted(autotune.read_entries(path)) == ["a|x=1", "b|x=2"]


def test_tune_keeps_the_fastest_and_skips_rejected_configs(dirs):
    cands = dk.attention_candidates(**{**dk.attention_bucket(**SHAPE)})
    assert len(cands) >= 4
    times = {c: 1.0 + i for i, c in enumerate(cands)}
    times[cands[2]] = 0.25
    lines = []

    def timer(t, cfg, sc):
        assert sc == dk.attention_bucket(**SHAPE)         # timed at the class shape
        if cfg == cands[1]:
            raise ValueError("shared memory exceeded\nsecond line")
        return times[cfg]

    r = autotune.tune("attention", SHAPE, timer=timer, log=lines.append)
    assert r["key"] == CLASS_KEY and r["best"] == cands[2]
    e = r["entry"]
    assert e["ms"] == 0.25 and e["heuristic_ms"] == 1.0 and e["config"] == dataclasses.asdict(cands[2])
    assert [ms for _, ms in e["timings"]][:3] == [1.0, None, 0.25] and len(e["timings"]) == len(cands)
    assert len(lines) == 1 and "skipped" in lines[0] and "shared memory exceeded" in lines[0]


@dataclasses.dataclass(frozen=True)
class _Scale:
    scale: float = 1.0
    pad: int = 0


def test_tune_measures_and_drops_configs_that_compute_something_else(monkeypatch):
    """Real measurement (a jnp stand-in kernel): the fastest config whose output matches the first
    candidate's wins; one that is fast but wrong is skipped with one line."""
    def run(cfg, x, interpret):
        y = x * cfg.scale
        return jnp.pad(y, (0, cfg.pad))[:x.shape[0]] if cfg.pad else y   # pad: slower, same values

    cands = [_Scale(1.0, 4096), _Scale(1.0), _Scale(1.5)]
    monkeypatch.setitem(autotune.KERNELS, "toy", autotune.Tunable(
        name="toy", config_cls=_Scale, bucket=lambda n: {"n": n}, candidates=lambda n: cands,
        make_inputs=lambda sc, key: jax.random.normal(key, (sc["n"],)), run=run))
    lines = []
    r = autotune.tune("toy", {"n": 4096}, reps=3, inner=2, log=lines.append)
    assert [c for c, ms in r["entry"]["timings"] if ms is None] == [dataclasses.asdict(cands[2])]
    assert len(lines) == 1 and "output differs" in lines[0]
    assert r["best"] in cands[:2]


def test_autotune_env_tunes_once_inside_jit_and_caches(dirs, monkeypatch):
    """POLAR_AUTOTUNE=1: a missing key is timed on first use, even from inside a jit trace (real
    measurement, interpret mode; S = 64 leaves the heuristic as the only candidate), written to the user
    cache, and not timed again."""
    user, _ = dirs
    monkeypatch.setenv("POLAR_AUTOTUNE", "1")
    calls = []
    real = autotune.measure

    def measure(*a, **kw):  # records (config, whether this runs under a trace: its numbers would be void)
        calls.append((a[1], isinstance(jnp.zeros(()) + 1, jax.core.Tracer)))
        return real(*a, **{**kw, "reps": 1, "inner": 1})

    monkeypatch.setattr(autotune, "measure", measure)
    shape = dict(B=2, N=4, K=2, S=64, H=64, C=2, dtype=jnp.float32)

    @jax.jit
    def f(x):
        cfg = dk.attention_config(**shape)
        return x + cfg.block_s

    assert int(f(jnp.int32(0))) == dk.attention_heuristic(**shape).block_s
    assert calls == [(dk.attention_heuristic(**shape), False)]
    entries = autotune.read_entries(_device_file(user))
    assert list(entries) == [autotune.class_key("attention", dk.attention_bucket(**shape))]
    autotune.clear()
    dk.attention_config(**shape)                          # from the user cache now
    assert len(calls) == 1


def test_polar_tune_help(capsys):
    with pytest.raises(SystemExit) as e:
        polar(["tune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--batch", "--ctx", "--kernels", "--out", "--allow-cpu"):
        assert flag in out


def test_polar_tune_refuses_cpu_in_one_line(capsys):
    assert polar(["tune", "--model", "tiny-llama-gqa"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--allow-cpu" in err and "'cpu'" in err


def test_polar_tune_check_refuses_zero_reps_in_one_line(tmp_path, capsys):
    """--reps 0 is named as the problem with --check too (it used to reach the tuner and end in a traceback
    saying every candidate config failed)."""
    table = tmp_path / "t.json"
    table.write_text("{}")
    assert polar(["tune", "--allow-cpu", "--check", str(table), "--reps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--reps must be >= 1, got 0" in err


@pytest.mark.parametrize("flags", [["--batch", "16"], ["--model", "tiny-llama-gqa", "--out", "x.json"],
                                   ["--resume"]])
def test_polar_tune_check_refuses_the_flags_it_would_ignore(tmp_path, capsys, flags):
    """--check tunes the keys of its table: flags that choose other keys or another output are refused by name,
    in one line, before anything is timed (they used to be ignored without a word)."""
    table = tmp_path / "t.json"
    table.write_text("{}")
    assert polar(["tune", "--allow-cpu", "--check", str(table), *flags]) == 2
    err = capsys.readouterr().err.strip()
    named = [f for f in flags if f.startswith("--")]
    assert "\n" not in err and f"{', '.join(named)} would be ignored" in err


def test_polar_tune_allow_cpu_end_to_end(dirs, tmp_path, monkeypatch, capsys):
    """Tiny preset in interpret mode: the table printed, --out in the shipped format, and that file used as
    the shipped table gives the kernels its configs."""
    _, table = dirs
    out = tmp_path / "out.json"
    assert polar(["tune", "--allow-cpu", "--model", "tiny-llama-gqa", "--batch", "2", "--ctx", "64",
                  "--kernels", "attention,mlp", "--max-candidates", "2", "--reps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "heuristic ms" in printed and "speedup" in printed
    data = json.loads(out.read_text())
    assert data["version"] == autotune.VERSION and data["device"] == autotune.device_kind()
    cfg = preset("tiny-llama-gqa")  # N 6, K 2, H 64, D 96, F 160
    attn = dict(B=2, N=6, K=2, S=64, H=64, C=2, dtype=jnp.bfloat16)
    want = {autotune.class_key("attention", dk.attention_bucket(**attn)),
            autotune.class_key("selective_up", sk.up_bucket(2, 96, 10 * 64, False, jnp.bfloat16)),
            autotune.class_key("selective_down", sk.down_bucket(2, 96, 6 * 64, jnp.bfloat16)),
            autotune.class_key("selective_up", sk.up_bucket(2, 96, cfg.mlp_dim, True, jnp.bfloat16)),
            autotune.class_key("selective_down", sk.down_bucket(2, 96, cfg.mlp_dim, jnp.bfloat16))}
    assert set(data["entries"]) == want
    for ck in want:
        assert ck in printed
    assert not _device_file(dirs[0]).exists()             # --out: the user cache is left alone
    assert polar(["tune", "--allow-cpu", "--model", "tiny-llama-gqa", "--batch", "2,3", "--ctx", "64",
                  "--kernels", "attention", "--max-candidates", "1", "--reps", "1", "--out", str(out), "--resume"]) == 0
    assert "wrote 1 entries" in capsys.readouterr().out   # B=2 was done; only B=3 is new
    data = json.loads(out.read_text())
    assert len(data["entries"]) == len(want) + 1

    # Make the up projection's entry differ from the heuristic, ship the file, and look it up.
    up_key = autotune.class_key("selective_up", sk.up_bucket(2, 96, cfg.mlp_dim, True, jnp.bfloat16))
    tuned = sk.UpConfig(block_b=16, block_n=64, block_k=32, split_k=2, num_warps=8, num_stages=3)
    data["entries"][up_key]["config"] = dataclasses.asdict(tuned)
    _write(_device_file(table), data["entries"])
    autotune.clear()
    assert sk.up_config(2, 96, cfg.mlp_dim, True, jnp.bfloat16) == tuned
    assert sk.up_config(2, 96, cfg.mlp_dim, True, jnp.float16) == sk.up_heuristic(2, 96, cfg.mlp_dim, True)


def test_polar_tune_model_from_a_directory(dirs, tmp_path, capsys):
    """--model takes a polar model directory or a transformers one (their config.json) besides a preset: the
    shapes, so the keys tuned, are the preset's when the config describes the same model."""
    from polar_jax.tune_cli import model_config

    cfg = preset("tiny-llama-gqa")  # N 6, K 2, H 64, D 96, F 160
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps(cfg.to_dict()))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 64, "intermediate_size": 160, "num_hidden_layers": 3, "vocab_size": 103}))
    for spec in (str(ours), str(ours / "config.json"), str(hf)):
        got = model_config(spec)
        assert (got.n_heads, got.n_kv_heads, got.head_dim, got.dim, got.mlp_dim, got.gated_mlp) == (6, 2, 64, 96, 160, True)
    assert model_config("tiny-llama-gqa") is cfg
    with pytest.raises(ValueError, match="neither a preset .* nor a model directory or config.json"):
        model_config(str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        model_config(str(tmp_path / "bad.json"))

    out = {}
    for name, spec in (("preset", "tiny-llama-gqa"), ("hf", str(hf))):
        out[name] = tmp_path / f"{name}.json"
        assert polar(["tune", "--allow-cpu", "--model", spec, "--batch", "2", "--ctx", "64", "--kernels", "mlp",
                      "--max-candidates", "1", "--reps", "1", "--out", str(out[name])]) == 0
    capsys.readouterr()
    assert set(autotune.read_entries(out["hf"])) == set(autotune.read_entries(out["preset"]))


def test_polar_tune_check_flags_a_slow_shipped_config(dirs, tmp_path, monkeypatch, capsys):
    """--check re-tunes each key of a table with its config timed beside the candidates, then times the shipped
    config against the winner head to head: exit 1 and SLOWER when it is > 5% slower there, 0 when within
    5% there even though the re-tune put it further behind (the re-tune's minimum is biased low)."""
    sc = dk.attention_bucket(B=2, N=4, K=2, S=64, H=64, C=2, dtype=jnp.float32)
    key = autotune.class_key("attention", sc)
    shipped = dk.AttentionConfig(block_s=32, splits=2, num_warps=4, num_stages=2)
    heuristic = dk.attention_heuristic(**sc)
    table = tmp_path / "table.json"
    autotune.write_table(table, autotune.device_kind(), {key: _entry(shipped)})
    seen, pairs = [], []

    def measure(t, cfg, s, **kw):
        seen.append((s, cfg))
        return {heuristic: 1.0, shipped: 1.2}[cfg], None  # the re-tune: shipped 20% behind

    def head_to_head(kernel, shape, configs, **kw):
        pairs.append((kernel, autotune.KERNELS[kernel].bucket(**shape), tuple(configs)))
        return [{heuristic: 1.0, shipped: slow}[c] for c in configs]

    monkeypatch.setattr(autotune, "measure", measure)
    monkeypatch.setattr(autotune, "head_to_head", head_to_head)
    args = ["tune", "--allow-cpu", "--check", str(table), "--reps", "1"]
    slow = 1.06
    with pytest.raises(SystemExit) as e:
        polar(args)
    assert e.value.code == 1
    assert seen == [(sc, heuristic), (sc, shipped)]
    assert pairs == [("attention", sc, (shipped, heuristic))]  # shipped against the re-tune's winner
    out = capsys.readouterr().out
    assert "SLOWER" in out and "1.200" in out and "1.060" in out and "0 of 1 shipped configs within 5%" in out
    slow = 1.04
    assert polar(args) == 0
    assert "1 of 1 shipped configs within 5%" in capsys.readouterr().out
    assert autotune.read_entries(table)[key]["config"] == dataclasses.asdict(shipped)   # --check alone writes nothing

    # --update: the slow entry is replaced by the re-tune's winner (with its timings), the rest stay.
    other = autotune.class_key("attention", dk.attention_bucket(B=3, N=4, K=2, S=64, H=64, C=2, dtype=jnp.float32))
    autotune.write_table(table, autotune.device_kind(), {key: _entry(shipped), other: _entry(heuristic)})
    slow = 1.06
    measure_all = measure

    def measure(t, cfg, s, **kw):
        return measure_all(t, cfg, s) if s == sc else (1.0, None)

    monkeypatch.setattr(autotune, "measure", measure)
    assert polar(args + ["--update"]) == 0
    out = capsys.readouterr().out
    assert "SLOWER" in out and f"--update: replaced 1 entries of {table} with the winner's config: {key}" in out
    entries = autotune.read_entries(table)
    assert entries[key]["config"] == dataclasses.asdict(heuristic) and entries[key]["ms"] == 1.0
    assert [c for c, _ in entries[key]["timings"]] == [dataclasses.asdict(heuristic), dataclasses.asdict(shipped)]
    assert entries[other] == _entry(heuristic)
    assert polar(["tune", "--allow-cpu", "--update"]) == 2
    assert "--update rewrites the table given to --check" in capsys.readouterr().err


def test_head_to_head_alternates_and_takes_medians():
    """Each round times every config once, in order (A, B, A, B, ...); the result is each config's median."""
    a = dk.AttentionConfig(block_s=32, splits=2, num_warps=4, num_stages=2)
    b = dk.AttentionConfig(block_s=64, splits=1, num_warps=4, num_stages=2)
    times = {a: iter([5.0, 1.0, 2.0]), b: iter([3.0, 9.0, 4.0])}
    order = []

    def timer(t, cfg, s):
        order.append(cfg)
        return next(times[cfg])

    shape = dict(B=2, N=4, K=2, S=64, H=64, C=2, dtype=jnp.float32)
    assert autotune.head_to_head("attention", shape, (a, b), rounds=3, timer=timer) == [2.0, 4.0]
    assert order == [a, b, a, b, a, b]


def test_autotune_env_failure_warns_and_keeps_the_heuristic(dirs, monkeypatch):
    user, _ = dirs
    monkeypatch.setenv("POLAR_AUTOTUNE", "1")

    def measure(*a, **kw):
        raise ValueError("rejected by the backend")

    monkeypatch.setattr(autotune, "measure", measure)
    with pytest.warns(UserWarning, match=r"POLAR_AUTOTUNE: tuning attention\|B=48.* failed"):
        assert dk.attention_config(**SHAPE) == dk.attention_heuristic(**SHAPE)
    assert not _device_file(user).exists()
