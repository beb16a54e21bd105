"""Makes a plain `lm_eval --model polar ...` find polar-jax's lm-eval model.

lm-eval 0.4 has no plugin discovery for models: `get_model` knows the names that `lm_eval.models` puts in its
registry and whatever was registered by modules imported before. This module is imported at interpreter start
by polar_lm_eval_plugin.pth (installed into site-packages beside it) and leaves one import hook on
sys.meta_path. When `lm_eval.models` is imported, the hook lets that import run and then registers `polar` as
lm-eval's lazy placeholder "polar_jax.evals.lm:PolarLM", so nothing of polar-jax (or JAX) is imported until
someone asks for the model. The hook removes itself as it fires. (`lm_eval.models`, not the registry module: a
registry that is not empty keeps `get_model` from importing lm-eval's own table, and `hf` would go missing.)

It costs one string comparison per import until then, and it never breaks an interpreter: if anything goes
wrong (lm-eval missing or of another layout, registration refused), `polar` stays unregistered and lm-eval
says it knows no such model, as it did before.
"""

from __future__ import annotations

import sys

TRIGGER = "lm_eval.models"
MODEL = "polar"
TARGET = "polar_jax.evals.lm:PolarLM"


def register() -> None:
    """Register `polar` as a lazy placeholder unless some registration of it is already there.

    polar_jax.evals.lm may have been imported first (its decorator registers the class itself): registering the
    placeholder then would be a conflict, so the check. The reverse order is fine: lm-eval upgrades the
    placeholder to the class when the decorator registers the same module:name.
    """
    from lm_eval.api.registry import model_registry

    if MODEL not in model_registry:
        model_registry.register(MODEL, target=TARGET)


class _Hook:
    """A meta-path finder that finds nothing itself; it wraps the loader of `lm_eval.models` once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRIGGER:
            return None
        uninstall()  # before searching: the finders below must not come back here
        try:
            for finder in sys.meta_path:
                spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)  # lm-eval's own errors propagate as usual
                if module.__name__ != TRIGGER:  # a loader shared by several modules (a zip): not ours
                    return
                try:
                    register()
                except Exception:  # noqa: BLE001  (a plugin must never break lm-eval)
                    pass

            spec.loader.exec_module = exec_then_register
            return spec
        except Exception:  # noqa: BLE001  (an odd finder or loader: let the normal import run untouched)
            return None


def install() -> None:
    """Put the hook first on sys.meta_path (once); it must come before `lm_eval.models` is imported."""
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


def uninstall() -> None:
    # A new list, not an edit in place: the import machinery is iterating over the old one right now, and
    # removing an entry under its feet would make it skip the next finder.
    sys.meta_path = [f for f in sys.meta_path if not isinstance(f, _Hook)]


install()
