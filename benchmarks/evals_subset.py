"""A fixed, documented subset of the task-data folder: small enough to carry to the GPU machine with the code.

The shared evals folder (23 MB) does not travel with the checkout; a run that scores the first N items of
each task needs only those rows. Writes OUT/NAME.jsonl with
  - the first N rows of each task (what lm-eval's --limit N scores), and
  - for mmlu (57 subjects in subject order) the first ceil(N / 57) rows of every subject, so that the subset
    covers every subject instead of the first one or two,
and OUT/SUBSET.json: the rule, the rows per task and each source file's sha256 (the subset is reproducible).
With --cut only the tasks named there are cut; every other task is copied whole.

    python -m benchmarks.evals_subset ../shared/evals .carry/evals --per-task 100
    python -m benchmarks.evals_subset ../shared/evals .carry/evals_full --per-task 300 --cut mmlu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

from polar_jax.evals import data

STRATIFIED = {"mmlu": "subject"}  # task -> the row key whose groups each keep their first rows


def subset(src: Path, out: Path, per_task: int, tasks: list[str] | None = None,
           cut: list[str] | None = None) -> dict:
    """Write the subset of every task (or `tasks`) of the folder `src` into `out`; returns the manifest.
    With `cut`, only those tasks are cut to `per_task` rows and the others are copied whole."""
    if per_task < 1:
        raise ValueError(f"--per-task must be >= 1, got {per_task}")
    src = data.data_dir(src)
    names = tasks or data.available(src)
    unknown = sorted(set(cut or ()) - set(names))
    if unknown:
        raise ValueError(f"--cut names tasks that are not among those written: {', '.join(unknown)}")
    out.mkdir(parents=True, exist_ok=True)
    rows_out, hashes, notes, whole = {}, {}, [], []
    for name in names:
        path = data.task_file(name, src)
        raw = path.read_bytes()
        hashes[name] = hashlib.sha256(raw).hexdigest()
        lines = [x for x in raw.decode().split("\n") if x.strip()]  # not splitlines: texts hold U+2028
        key = STRATIFIED.get(name)
        if cut is not None and name not in cut:
            keep = lines
            whole.append(name)
        elif key is None:
            keep = lines[:per_task]
        else:
            groups: dict[str, list[str]] = {}
            for n, line in enumerate(lines, 1):
                g = json.loads(line).get(key)
                if g is None:
                    raise data.TaskDataError(f"{path}:{n}: missing key {key!r} (its subset keeps rows per {key})")
                groups.setdefault(g, []).append(line)
            each = math.ceil(per_task / len(groups))
            keep = [line for rows in groups.values() for line in rows[:each]]
            notes.append(f"{name}: the first {each} rows of each of its {len(groups)} {key} values")
        (out / path.name).write_text("\n".join(keep) + "\n")
        rows_out[name] = len(keep)
    strat = "; ".join(notes)
    rule = f"--per-task {per_task}" + (f" --cut {','.join(cut)}" if cut is not None else "")
    which = "each task" if not whole else f"{', '.join(n for n in names if n not in whole)}"
    description = (f"A fixed subset (benchmarks.evals_subset {rule}): the first {per_task} rows of {which}"
                   + (f" ({strat})" if strat else "") + (f"; whole splits of {', '.join(whole)}" if whole else "") + ".")
    manifest = {"description": description, "per_task": per_task, "cut": cut, "rows": rows_out, "source": str(src),
                "source_sha256": hashes}
    (out / "SUBSET.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the task-data folder (NAME.jsonl files)")
    p.add_argument("out", type=Path, help="the folder to write")
    p.add_argument("--per-task", type=int, required=True, help="rows kept per task")
    p.add_argument("--tasks", help="comma-separated task names (default: every file)")
    p.add_argument("--cut", help="comma-separated tasks to cut to --per-task rows; the others are copied whole "
                   "(default: every task is cut)")
    a = p.parse_args(argv)
    m = subset(Path(a.src), a.out, a.per_task, a.tasks.split(",") if a.tasks else None,
               a.cut.split(",") if a.cut else None)
    size = sum(f.stat().st_size for f in a.out.iterdir())
    print(f"wrote {a.out}: {sum(m['rows'].values())} rows, {size / 1e6:.2f} MB; " +
          ", ".join(f"{t} {n}" for t, n in m["rows"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
