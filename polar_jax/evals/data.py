"""Task data: the normalised JSONL of ../shared/evals (schema in its README) and each task's lm-eval definition.

One JSON object per line: id, kind ("mc", "lambada" or "partial"), context, choices, gold (+ continuation for
"partial"). Choices carry lm-eval's target delimiter as their first character, so the lm-eval configs built
here hand lm-eval `choice[1:]` with target_delimiter " " and lm-eval's acc_norm divides by len(choice) - 1,
as the README's rule says. Every problem with a file is a TaskDataError naming the file and the line.

The folder comes from an argument, else $POLAR_EVALS_DIR; nothing is read from a fixed path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV_DIR = "POLAR_EVALS_DIR"
KINDS = ("mc", "lambada", "partial")
# lm-eval's metrics per task (its YAMLs); a task of a user's own not named here gets its kind's default.
TASK_METRICS = {
    "hellaswag": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm"), "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"), "openbookqa": ("acc", "acc_norm"), "copa": ("acc",), "rte": ("acc",),
    "sglue_rte": ("acc",), "lambada_openai": ("perplexity", "acc"), "mmlu": ("acc",), "winogrande": ("acc",),
}
KIND_METRICS = {"mc": ("acc", "acc_norm"), "lambada": ("perplexity", "acc"), "partial": ("acc",)}


class TaskDataError(ValueError):
    """A task that cannot be found or a data file that breaks the schema (the message names file and line)."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The task-data folder: `path`, else $POLAR_EVALS_DIR."""
    if path is None:
        path = os.environ.get(ENV_DIR)
        if not path:
            raise TaskDataError(f"no task-data folder: pass --tasks-dir DIR or set {ENV_DIR}=DIR (a folder of "
                                "NAME.jsonl files, e.g. the shared evals folder)")
    path = Path(path)
    if not path.is_dir():
        raise TaskDataError(f"task-data folder not found: {path}")
    return path


def available(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.jsonl"))


def task_file(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The file of task `name`: FOLDER/NAME.jsonl; an unknown name lists the tasks the folder has."""
    folder = data_dir(folder)
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        have = available(folder)
        raise TaskDataError(f"unknown task {name!r}: {path} does not exist (tasks in {folder}: "
                            f"{', '.join(have) or 'none'})")
    return path


def _check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, typ in (("id", str), ("kind", str), ("context", str), ("choices", list), ("gold", int)):
        if key not in row:
            raise TaskDataError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], typ) or (typ is int and isinstance(row[key], bool)):
            raise TaskDataError(f"{where}: {key!r} must be {typ.__name__}, got {row[key]!r:.60}")
    kind, choices, gold = row["kind"], row["choices"], row["gold"]
    if kind not in KINDS:
        raise TaskDataError(f"{where}: kind {kind!r}; choose one of {KINDS}")
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise TaskDataError(f"{where}: 'choices' must be a non-empty list of non-empty strings")
    if not 0 <= gold < len(choices):
        raise TaskDataError(f"{where}: gold {gold} is not an index into {len(choices)} choices")
    if kind == "lambada" and (len(choices) != 1 or gold != 0):
        raise TaskDataError(f"{where}: a lambada row has one choice (the target) and gold 0")
    # lm-eval's target delimiter is the choice's (mc, lambada) or continuation's (partial) first character.
    delimited = [row.get("continuation")] if kind == "partial" else choices
    for c in delimited:
        if not isinstance(c, str) or not c.startswith(" ") or len(c) < 2:
            name = "'continuation'" if kind == "partial" else "every choice"
            raise TaskDataError(f"{where}: {name} must start with the delimiter space and have text after it, got "
                                f"{c!r:.60}")
    return row


def read_task(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The rows of a task file (the first `limit` when given), each checked against the schema."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"task data file not found: {path}")
    rows, kinds, ids = [], set(), {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_check_row(row, where))
            if row["id"] in ids:
                raise TaskDataError(f"{where}: id {row['id']!r} repeats line {ids[row['id']]}; ids are unique per file")
            ids[row["id"]] = n
            kinds.add(row["kind"])
            if len(kinds) > 1:
                raise TaskDataError(f"{where}: kind {row['kind']!r} differs from the file's earlier rows "
                                    f"({sorted(kinds - {row['kind']})[0]!r}); one kind per file")
    if not rows:
        raise TaskDataError(f"{path}: no rows")
    return rows


def metrics_for(name: str, kind: str) -> tuple[str, ...]:
    return TASK_METRICS.get(name, KIND_METRICS[kind])


# lm-eval's doc functions over the schema (the YAMLs in tasks/ and task_config below use the same ones).
def doc_to_text(doc: dict):
    return doc["gold"] if doc["kind"] == "partial" else doc["context"]  # partial: an int = multiple inputs


def doc_to_choice(doc: dict) -> list[str]:
    if doc["kind"] == "partial":
        return [doc["context"] + c for c in doc["choices"]]
    return [c[1:] for c in doc["choices"]]  # the delimiter comes back through target_delimiter


def doc_to_target(doc: dict):
    if doc["kind"] == "partial":
        return doc["continuation"][1:]
    if doc["kind"] == "lambada":
        return doc["choices"][0]  # a loglikelihood task adds no delimiter of its own
    return doc["gold"]


def as_dataset(path: str | os.PathLike) -> dict:
    """{"test": datasets.Dataset} of a task file, the form lm-eval's `custom_dataset` returns."""
    import datasets

    return {"test": datasets.Dataset.from_list(read_task(path))}


def dataset(task_file: str, evals_dir: str | None = None, **_metadata) -> dict:
    """lm-eval `custom_dataset` of the YAML tasks: FOLDER/task_file, FOLDER = --metadata's evals_dir, else
    $POLAR_EVALS_DIR. lm-eval passes the task's dataset_kwargs and --metadata as keywords."""
    if evals_dir is None and not os.environ.get(ENV_DIR):  # lm_eval has no --tasks-dir: name what it takes
        raise TaskDataError(f"no task-data folder for {task_file}: set {ENV_DIR}=DIR or pass lm_eval --metadata "
                            "'{\"evals_dir\": \"DIR\"}' (a folder of NAME.jsonl files, e.g. the shared evals folder)")
    folder = data_dir(evals_dir)
    path = folder / task_file
    if not path.is_file():
        raise TaskDataError(f"task data file not found: {path} (set {ENV_DIR}, or pass --metadata "
                            "'{\"evals_dir\": \"DIR\"}')")
    return as_dataset(path)


def task_config(name: str, path: str | os.PathLike, kind: str | None = None) -> dict:
    """The lm-eval task config (a dict for lm_eval's TaskConfig) of task `name` over the JSONL file `path`."""
    path = Path(path)
    if kind is None:
        kind = read_task(path, limit=1)[0]["kind"]
    metric = {"acc": ("mean", True), "acc_norm": ("mean", True), "perplexity": ("perplexity", False)}
    cfg = {
        "task": name,
        "custom_dataset": lambda **_: as_dataset(path),
        "test_split": "test",
        "output_type": "loglikelihood" if kind == "lambada" else "multiple_choice",
        "doc_to_text": doc_to_text,
        "doc_to_target": doc_to_target,
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": metric[m][0], "higher_is_better": metric[m][1]}
                        for m in metrics_for(name, kind)],
        "metadata": {"version": 1.0},
    }
    if kind != "lambada":
        cfg["doc_to_choice"] = doc_to_choice
    return cfg
