"""lm-eval's command line with the `polar` model registered and this package's tasks on the include path.

    python -m polar_jax.evals.lm_eval_main --model polar --model_args model=DIR,batch_size=32 \
        --tasks piqa,arc_easy --limit 100          # (also installed as `polar-lm-eval`)

An installed polar-jax also makes lm-eval's own `lm_eval --model polar` work (polar_lm_eval_plugin, imported
at start by a .pth file); that one needs `--include_path "$(polar eval tasks --print-include-path)"` for these
tasks. This wrapper adds polar_jax/evals/tasks to --include_path unless one is given, keeps the Hugging Face
hub offline, and registers `polar` by importing polar_jax.evals.lm itself, so it also works where the .pth
is not installed (a checkout on PYTHONPATH). Task data: $POLAR_EVALS_DIR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every input is local; lm-eval would otherwise probe the hub
    from lm_eval.__main__ import cli_evaluate

    import polar_jax.evals.lm  # noqa: F401  (registers `polar`, after lm-eval's own models)

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
