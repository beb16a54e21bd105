"""A plain `lm_eval --model polar` (issue 10): the import hook of polar_lm_eval_plugin in fresh interpreters,
and lm-eval's own console script on a tiny random model with the .pth of an installed polar-jax."""

import importlib.metadata
import json
import os
import re
import site
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
PTH = "polar_lm_eval_plugin.pth"


def python(code: str, *paths, timeout=120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout first (then `paths`)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*paths, REPO]))}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_hook_registers_polar_lazily_beside_lm_evals_models():
    out = check(python("""
        import sys
        import polar_lm_eval_plugin
        assert not {"lm_eval", "jax", "polar_jax"} & set(sys.modules), "the hook imported something heavy"
        import lm_eval.models
        from lm_eval.api.registry import get_model, model_registry
        table = dict(model_registry.items())
        assert table["polar"] == "polar_jax.evals.lm:PolarLM", table.get("polar")
        assert "polar_jax" not in sys.modules, "registering imported the model"
        assert {k: v for k, v in table.items() if k != "polar"} == lm_eval.models.MODEL_MAPPING
        assert not any(isinstance(f, polar_lm_eval_plugin._Hook) for f in sys.meta_path), "hook still there"
        from polar_jax.evals.lm import PolarLM
        assert get_model("polar") is PolarLM
        print("ok")
    """))
    assert out.split() == ["ok"]


def test_polar_imported_first_keeps_lm_evals_models():
    """Importing polar_jax.evals.lm first loads lm-eval's table before its decorator registers `polar` (the hook's
    placeholder is upgraded to the class, no conflict), so `hf` stays known: a registry that is not empty keeps
    get_model from loading lm-eval's table itself."""
    out = check(python("""
        import polar_lm_eval_plugin
        from polar_jax.evals.lm import PolarLM
        from lm_eval.api.registry import get_model, model_registry
        assert get_model("polar") is PolarLM
        assert dict(model_registry.items())["hf"] == "lm_eval.models.huggingface:HFLM"
        from lm_eval.models.huggingface import HFLM
        assert get_model("hf") is HFLM
        print("ok")
    """))
    assert out.split() == ["ok"]


def test_hook_is_silent_with_an_lm_eval_of_another_layout(tmp_path):
    (tmp_path / "lm_eval" / "models").mkdir(parents=True)
    (tmp_path / "lm_eval" / "__init__.py").write_text("")
    (tmp_path / "lm_eval" / "models" / "__init__.py").write_text("LOADED = True\n")  # no lm_eval.api
    proc = python("""
        import polar_lm_eval_plugin
        import lm_eval.models
        assert lm_eval.models.LOADED
        print("ok")
    """, tmp_path)
    assert check(proc).split() == ["ok"] and proc.stderr == ""


def test_wrapper_keeps_lm_evals_own_models():
    """`polar-lm-eval --model hf` (the wrapper registers `polar` itself, which used to hide lm-eval's table)."""
    out = check(python("""
        import lm_eval.__main__
        lm_eval.__main__.cli_evaluate = lambda: None  # the CLI itself is not under test
        from polar_jax.evals.lm_eval_main import main
        main(["--model", "hf"])
        from lm_eval.api.registry import get_model, model_registry
        assert get_model("polar").__name__ == "PolarLM"
        assert dict(model_registry.items())["hf"] == "lm_eval.models.huggingface:HFLM"
        print("ok")
    """))
    assert out.split() == ["ok"]


def installed_here() -> bool:
    """Whether this interpreter's polar-jax is an editable install of this checkout (as test.sh makes it)."""
    # The installed distribution in site-packages, not the build's polar_jax.egg-info in the checkout (the
    # checkout is on sys.path first, and importlib.metadata.distribution would find that one).
    for dist in importlib.metadata.distributions(name="polar-jax", path=site.getsitepackages()):
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        path = urllib.parse.urlparse(url.get("url", "")).path
        if path and Path(urllib.parse.unquote(path)).resolve() == REPO:
            return True
    return False


def test_lm_eval_console_script_runs_polar(tmp_path):
    """The literal command of issue 10: lm-eval's own `lm_eval`, the task YAMLs by --include_path."""
    import jax.numpy as jnp

    from polar_jax import checkpoint, preset
    from tests.test_cli import char_tokenizer
    from tests.test_convert import random_params
    from tests.test_lm_eval import shared_evals

    evals = shared_evals()
    if not installed_here():
        pytest.skip(f"this interpreter's polar-jax is not an editable install of {REPO}")
    pths = [Path(d) / PTH for d in site.getsitepackages() if (Path(d) / PTH).is_file()]
    assert pths, f"{PTH} is not in {site.getsitepackages()}: pip install -e . again (setup.py writes it)"
    include = check(python("from polar_jax.cli import main; main(['eval', 'tasks', '--print-include-path'])"))
    assert Path(include.strip()) == REPO / "polar_jax" / "evals" / "tasks"

    cfg = preset("tiny-llama-gqa")
    char_tokenizer().save_pretrained(tmp_path / "tok")
    model = checkpoint.save(tmp_path / "tiny", cfg, random_params(cfg, jnp.float32), tokenizer_dir=tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": str(REPO), "POLAR_EVALS_DIR": str(evals), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [Path(sys.executable).parent / "lm_eval", "--model", "polar", "--model_args", f"model={model},batch_size=8",
         "--tasks", "arc_easy", "--include_path", include.strip(), "--limit", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = check(proc)
    assert re.search(r"^polar \(\{'model': ", out, re.M), out
    number = r"\s*[01](\.\d+)?\s*"
    assert re.search(rf"\|arc_easy\s*\|\s*1\|none\s*\|\s*0\|acc\s*\|[^|]*\|{number}\|", out), out
    assert re.search(rf"\|\s*\|\s*\|none\s*\|\s*0\|acc_norm\|[^|]*\|{number}\|", out), out
