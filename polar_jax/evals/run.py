"""Evaluate tasks through lm-eval's own evaluator (the same one `lm_eval --model polar` runs) and tabulate.

Tasks come from a folder of NAME.jsonl files (data.py); each becomes an lm-eval ConfigurableTask built in
memory from the same config as the YAMLs in tasks/, so no task index or hub is involved.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np

from polar_jax.evals import data


def build_tasks(names: list[str], folder: str | os.PathLike | None = None) -> list:
    """lm-eval Task objects for task names (files FOLDER/NAME.jsonl; FOLDER default $POLAR_EVALS_DIR)."""
    from lm_eval.api.task import ConfigurableTask

    if not names:
        raise data.TaskDataError("no tasks named: pass --tasks NAME[,NAME...]")
    paths = {n: data.task_file(n, folder) for n in names}  # every name checked before any file is read
    return [ConfigurableTask(config=data.task_config(n, p)) for n, p in paths.items()]


def evaluate(lm, names: list[str], folder: str | os.PathLike | None = None, limit: int | None = None,
             bootstrap_iters: int = 1000) -> dict:
    """{task: {"metrics": {metric: value}, "stderr": {metric: value}, "n": docs, "preds": [...]}} plus
    "_timing" {"seconds", "requests", "requests_per_s"}.

    lm: an lm-eval LM (a PolarLM, or lm-eval's own `hf` for a side-by-side). stderr: lm-eval's (the sample
    standard error for acc; a bootstrap of `bootstrap_iters` for perplexity). preds, in document order: the
    argmax choice (multiple choice) or whether greedy decoding reproduced the target (lambada), so two runs
    can be compared item by item. "_timing" also has "model_seconds" and "model_requests_per_s": the time
    inside the LM's request methods alone.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = build_tasks(names, folder)
    model_seconds = _time_requests(lm)
    # A full collection now, untimed: otherwise the pass may pay for a full collection of the whole heap that
    # earlier work made due (a compilation's objects, earlier passes' garbage), which lands in one pass and not
    # the next (on a CPU, comparable to the rest of lm-eval's side of a pass) and blurs comparisons between passes.
    gc.collect()
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=tasks, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=True,
                          task_manager=TaskManager(include_defaults=False))
    seconds = time.perf_counter() - t0
    out, n_requests = {}, 0
    for name in names:
        r = res["results"][name]
        metrics = {k.split(",")[0]: v for k, v in r.items() if "," in k and "_stderr" not in k}
        stderr = {k.split(",")[0].replace("_stderr", ""): v for k, v in r.items() if "_stderr," in k}
        samples = sorted(res["samples"][name], key=lambda x: x["doc_id"])
        n_requests += sum(len(x["filtered_resps"]) for x in samples)
        greedy = "perplexity" in metrics  # a lambada task: one target, right when greedy decoding reproduces it
        preds = [int(bool(x["filtered_resps"][0][1])) if greedy else
                 int(np.argmax([float(ll) for ll, _ in x["filtered_resps"]])) for x in samples]
        out[name] = {"metrics": metrics, "stderr": stderr, "n": res["n-samples"][name]["effective"], "preds": preds}
    out["_timing"] = {"seconds": seconds, "requests": n_requests, "requests_per_s": n_requests / seconds,
                      "model_seconds": model_seconds[0],
                      "model_requests_per_s": n_requests / max(model_seconds[0], 1e-9)}
    return out


def _time_requests(lm) -> list[float]:
    """Time spent inside the LM's request methods (a one-element list, added to as lm-eval calls them): the
    model's share of an evaluation, apart from lm-eval's own work (documents, prompts, metrics)."""
    clock = [0.0]
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def timed(*args, _method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - t0

        setattr(lm, name, timed)  # an instance attribute: lm-eval looks the method up on the instance
    return clock


def markdown(rows: list[dict], metric_order=("acc", "acc_norm", "perplexity")) -> str:
    """A table of results: rows of {"label": ..., "results": evaluate(...)}; one column per run."""
    tasks = [t for t in rows[0]["results"] if not t.startswith("_")]
    lines = ["| task | metric | n | " + " | ".join(r["label"] for r in rows) + " |",
             "|---|---|---:|" + "---:|" * len(rows)]
    for t in tasks:
        first = rows[0]["results"][t]
        for m in [m for m in metric_order if m in first["metrics"]]:
            cells = []
            for r in rows:
                v, se = r["results"][t]["metrics"][m], r["results"][t]["stderr"].get(m)
                scale = 1 if m == "perplexity" else 100  # accuracies in percent
                cells.append(f"{v * scale:.2f}" + (f" ± {se * scale:.2f}" if isinstance(se, float) else ""))
            lines.append(f"| {t} | {m} | {first['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
