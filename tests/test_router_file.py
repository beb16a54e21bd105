"""Router files (training/router_file.py): export from a routed fp32 model, attach to a bf16 copy of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polar_jax import SparsityConfig, init_params, preset
from polar_jax.checkpoint import load, save
from training import router_file
from training.routers import init_attn, init_mlp

CFG = preset("tiny-llama-gqa")  # K = 2 groups of 3 heads, 3 layers: router shapes [3, 96, 2]


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """(fp32 model dir with attn + mlp routers, its sparsity JSON, the same model without routers in bf16)."""
    tmp = tmp_path_factory.mktemp("routers")
    params = init_params(CFG, jax.random.key(1))
    k1, k2 = jax.random.split(jax.random.key(2))
    routers = {"attn": init_attn(CFG, k1), "mlp": init_mlp(CFG, k2, hidden=24)}
    routers["attn"]["b"] = jax.random.normal(k2, routers["attn"]["b"].shape)  # fresh values, not init's zeros
    model = save(tmp / "routed", CFG, {**params, "routers": routers})
    sp_path = tmp / "sparsity.json"
    SparsityConfig(attn="router", attn_density=(1.0, 0.5, 0.5), mlp="router", mlp_k=7).to_json(sp_path)
    bf16 = save(tmp / "bf16", CFG, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    return model, sp_path, bf16, routers


def test_round_trip_into_a_bf16_copy(routed, tmp_path):
    model, sp_path, bf16, routers = routed
    f = router_file.export_routers(model, tmp_path / "r.npz", sparsity=sp_path)
    assert f.stat().st_size < 200_000  # the routers alone, not the model
    out, sp = router_file.attach(f, bf16, tmp_path / "attached", sparsity_out=tmp_path / "sp.json")
    cfg, params, _ = load(out)
    assert cfg == CFG and params["embed"].dtype == jnp.bfloat16
    for kind, names in (("attn", ("w", "b")), ("mlp", ("w1", "b1", "w2", "b2"))):
        for name in names:
            got = params["routers"][kind][name]
            assert got.dtype == jnp.bfloat16, (kind, name)
            want = np.asarray(routers[kind][name], np.float32)
            np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    assert sp == SparsityConfig.from_json(sp_path) == SparsityConfig.from_json(tmp_path / "sp.json")
    # the model's own weights are untouched by the attach
    np.testing.assert_array_equal(np.asarray(params["layers"]["wqkv"]), np.asarray(load(bf16)[1]["layers"]["wqkv"]))


def test_attach_in_memory_keeps_dtype_and_has_no_sparsity_without_one(routed, tmp_path):
    model, _, _, routers = routed
    f = router_file.export_routers(model, tmp_path / "r.npz")
    params, sp = router_file.attach_routers(CFG, init_params(CFG, jax.random.key(1)), f)
    assert sp is None
    np.testing.assert_array_equal(np.asarray(params["routers"]["attn"]["w"]), np.asarray(routers["attn"]["w"]))
    with pytest.raises(ValueError, match="holds no sparsity config"):
        router_file.attach(f, model, tmp_path / "x", sparsity_out=tmp_path / "x.json")


def test_other_model_or_checkpoint_refused(routed, tmp_path):
    model, _, _, _ = routed
    f = router_file.export_routers(model, tmp_path / "r.npz")
    other = CFG.replace(n_layers=4)
    with pytest.raises(ValueError, match=r"another model: n_layers 3 vs 4"):
        router_file.attach_routers(other, init_params(other, jax.random.key(1)), f)
    with pytest.raises(ValueError, match="another checkpoint"):  # same shapes, other weights
        router_file.attach_routers(CFG, init_params(CFG, jax.random.key(5)), f)


def test_wrong_router_shapes_refused(routed, tmp_path):
    model, _, _, _ = routed
    f = router_file.export_routers(model, tmp_path / "r.npz")
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["routers/attn/w"] = arrays["routers/attn/w"][:, :, :1]  # one group's logit instead of K = 2
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=r"attn router 'w' has shape \(3, 96, 1\), tiny-llama-gqa needs \(3, 96, 2\)"):
        router_file.attach_routers(CFG, init_params(CFG, jax.random.key(1)), tmp_path / "bad.npz")


def test_export_refusals_and_cli(routed, tmp_path, capsys):
    model, sp_path, bf16, _ = routed
    with pytest.raises(ValueError, match="has no routers to export"):
        router_file.export_routers(bf16, tmp_path / "r.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a router file"):
        router_file.read_routers(tmp_path / "junk.npz")
    assert router_file.main(["export", str(model), str(tmp_path / "c.npz"), "--sparsity", str(sp_path)]) == 0
    assert router_file.main(["attach", str(tmp_path / "c.npz"), str(bf16), "--out", str(bf16)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_eval_tasks_runs_each_router_file_at_its_density(tmp_path):
    """benchmarks.eval_tasks: one router run per file (its own routers and config), oracle/random beside it."""
    from benchmarks.eval_tasks import head_runs, parse

    cfg = preset("tiny-llama-gqa").replace(n_kv_heads=3, n_heads=6)  # K = 3: densities 1/3 and 2/3
    params = init_params(cfg, jax.random.key(1))
    files = []
    for k in (2, 1):  # listed out of order: the runs come sorted by density
        attn = init_attn(cfg, jax.random.key(10 + k))
        save(tmp_path / f"k{k}", cfg, {**params, "routers": {"attn": attn}})
        SparsityConfig(attn="router", attn_density=k / 3).to_json(tmp_path / f"k{k}.json")
        files.append(router_file.export_routers(tmp_path / f"k{k}", tmp_path / f"k{k}.npz", tmp_path / f"k{k}.json"))
    args = parse(["--model", "unused", "--out", "unused", "--routers", ",".join(map(str, files))])
    runs = head_runs(cfg, params, args)
    assert [(s, round(d * 3)) for s, d, _, _ in runs] == [("dense", 3), ("router", 1), ("oracle", 1), ("random", 1),
                                                          ("router", 2), ("oracle", 2), ("random", 2)]
    for (source, d, p, sp), k in zip([runs[1], runs[4]], (1, 2)):
        assert sp == SparsityConfig(attn="router", attn_density=k / 3)
        want = load(tmp_path / f"k{k}")[1]["routers"]["attn"]["w"]
        np.testing.assert_array_equal(np.asarray(p["routers"]["attn"]["w"]), np.asarray(want))
    assert runs[0][3] is None and "routers" not in runs[2][2]  # oracle and random run on the bare params
    assert runs[2][3] == SparsityConfig(attn="oracle", attn_density=1 / 3)


def test_eval_tasks_resume_keeps_only_runs_of_the_same_settings(tmp_path):
    import json

    from benchmarks.eval_tasks import resumed_runs

    partial = tmp_path / "eval_tasks.partial.json"
    settings = {"model": "m", "tasks": ["copa"], "limit": 25}
    assert resumed_runs(partial, settings) == {}  # nothing to resume
    run = {"label": "router 2/3", "source": "router", "density": 2 / 3, "results": {"copa": {"acc": 0.7}}}
    partial.write_text(json.dumps({"settings": settings, "runs": [run]}))
    assert resumed_runs(partial, settings) == {"router 2/3": run}
    with pytest.raises(SystemExit, match="other settings"):
        resumed_runs(partial, settings | {"limit": 50})


def test_eval_tasks_out_prefix_keeps_its_dots(tmp_path):
    """--out is a prefix: OUT.json etc. are appended, so prefixes that differ after a dot (densities, versions)
    do not overwrite each other's files (Path.with_suffix would cut "eval_0.5" and "eval_0.6" to "eval_0")."""
    from benchmarks.eval_tasks import out_paths

    assert out_paths(tmp_path / "eval_tasks") == {
        "json": tmp_path / "eval_tasks.json", "md": tmp_path / "eval_tasks.md", "png": tmp_path / "eval_tasks.png",
        "partial": tmp_path / "eval_tasks.partial.json"}
    a, b = out_paths(tmp_path / "eval_0.5"), out_paths(tmp_path / "eval_0.6")
    assert a["json"] == tmp_path / "eval_0.5.json" and a["partial"] == tmp_path / "eval_0.5.partial.json"
    assert not set(a.values()) & set(b.values())


def test_eval_tasks_resume_names_a_damaged_partial_file(tmp_path):
    from benchmarks.eval_tasks import resumed_runs

    partial = tmp_path / "eval_tasks.partial.json"
    partial.write_text('{"settings": {"model": "m"}, "runs": [{"lab')  # a run killed mid-write (before the fix)
    with pytest.raises(SystemExit, match=f"{partial} is not valid JSON.*delete it or drop --resume"):
        resumed_runs(partial, {"model": "m"})


def test_eval_tasks_refuses_non_positive_limits(capsys):
    from benchmarks.eval_tasks import parse

    for flag in ("--limit", "--batch-size", "--speed-limit"):
        with pytest.raises(SystemExit):
            parse(["--model", "m", "--out", "o", flag, "0"])
        assert f"{flag}: must be a positive integer, got 0" in capsys.readouterr().err


def test_eval_tasks_speed_lines_compare_with_hf_at_its_best_and_its_default():
    """The throughput lines: `polar` against `hf` at its faster batch size, and against batch size 1 (lm-eval's
    default) when that ran, in whole-pass and model-time requests/s."""
    from benchmarks.eval_tasks import speed_lines

    def t(rps, model_rps):
        return {"cold_s": 2.0, "warm_s": 1.0, "requests": 100, "requests_per_s": rps, "model_s": 0.1,
                "model_requests_per_s": model_rps}

    speed = {"task": "arc_easy", "dtype": "bfloat16", "polar_batch_size": 1024, "polar": t(900.0, 5000.0),
             "hf": {64: t(700.0, 1500.0), 256: t(800.0, 2000.0), 1: t(100.0, 125.0)}, "hf_best_batch_size": 256,
             "speedup": 900 / 800, "model_speedup": 5000 / 2000, "speedup_vs_default": 9.0,
             "model_speedup_vs_default": 40.0}
    text = "\n".join(speed_lines(speed))
    assert "1.12x the warm requests/s of `hf` at its faster batch size (256), 2.50x counting model time" in text
    assert "default batch size (1): 9.00x the warm requests/s, 40.00x counting model time" in text
    del speed["hf"][1]
    assert "default batch size" not in "\n".join(speed_lines(speed))
