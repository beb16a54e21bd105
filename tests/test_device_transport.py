"""What travels to the GPU machine: large files in parts (scripts/device_parts.sh), a task-data subset."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.evals_subset import subset
from polar_jax.evals import data

ROOT = Path(__file__).resolve().parents[1]
PARTS = ROOT / "scripts" / "device_parts.sh"


def parts(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PARTS), *args], check=False, cwd=cwd, capture_output=True, text=True)


def test_parts_travel_over_consecutive_calls_and_reassemble(tmp_path):
    blob = np.random.default_rng(0).integers(0, 256, 2 * 2**20 + 12345, dtype=np.uint8).tobytes()  # 2 MiB + odd
    (tmp_path / "model.gguf").write_bytes(blob)
    r = parts("split", "model.gguf", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in (tmp_path / ".carry" / "parts").iterdir())
    assert made == ["model.gguf.part-00", "model.gguf.part-01", "model.gguf.part-02", "model.gguf.sha256"]
    home = tmp_path / "home"
    for i, expect in ((0, "parts 00 of 3; missing 01 02"), (2, "parts 00 02 of 3; missing 01"),
                      (1, "assembled from 3 parts")):
        call = tmp_path / f"call{i}"  # a fresh checkout per call, carrying one part and the hash file
        (call / ".carry" / "parts").mkdir(parents=True)
        for name in (f"model.gguf.part-{i:02d}", "model.gguf.sha256"):
            (call / ".carry" / "parts" / name).write_bytes((tmp_path / ".carry" / "parts" / name).read_bytes())
        r = parts("gather", str(home), cwd=call)
        assert r.returncode == 0 and expect in r.stdout, r.stdout + r.stderr
    assert (home / "model.gguf").read_bytes() == blob
    assert not list(home.glob("*.part-*"))
    r = parts("gather", str(home), cwd=tmp_path / "call0")  # idempotent: a later call finds it assembled
    assert r.returncode == 0 and "model.gguf assembled (" in r.stdout
    assert not list(home.glob("*.part-*"))  # the part carried again is not left lying beside the file


def test_parts_with_a_wrong_hash_are_refused_and_dropped(tmp_path):
    (tmp_path / "f.bin").write_bytes(os.urandom(3 * 2**20))
    assert parts("split", "f.bin", "2", cwd=tmp_path).returncode == 0
    home = tmp_path / "home"
    home.mkdir()
    for p in (tmp_path / ".carry" / "parts").iterdir():
        raw = bytearray(p.read_bytes())
        if p.name.endswith("part-01"):
            raw[7] ^= 0xFF  # one flipped byte in transit
        (home / p.name).write_bytes(bytes(raw))
    r = parts("gather", str(home), cwd=home)
    assert r.returncode == 3 and "hash differs" in r.stderr
    assert not (home / "f.bin").exists() and not list(home.glob("*.part-*"))
    assert parts("split", "f.bin", "40", cwd=tmp_path).returncode == 2  # a part of 40 MiB would not travel


def write_task(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_subset_keeps_first_rows_and_every_mmlu_subject(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    piqa = [{"id": f"p{i}", "kind": "mc", "context": f"goal {i}\u2028line", "choices": [" a", " b"], "gold": i % 2}
            for i in range(7)]
    subjects = ["algebra", "anatomy", "virology"]
    mmlu = [{"id": f"{s}-{i}", "kind": "mc", "subject": s, "context": "Q", "choices": [" A", " B"], "gold": 0}
            for s, n in zip(subjects, (4, 1, 5)) for i in range(n)]
    write_task(src / "piqa.jsonl", piqa)
    write_task(src / "mmlu.jsonl", mmlu)
    m = subset(src, tmp_path / "out", per_task=5)
    got = {t: [r["id"] for r in data.read_task(tmp_path / "out" / f"{t}.jsonl")] for t in ("piqa", "mmlu")}
    assert got["piqa"] == ["p0", "p1", "p2", "p3", "p4"]
    assert got["mmlu"] == ["algebra-0", "algebra-1", "anatomy-0", "virology-0", "virology-1"]  # ceil(5/3) each
    assert m["rows"] == {"mmlu": 5, "piqa": 5}
    assert m["source_sha256"]["piqa"] == hashlib.sha256((src / "piqa.jsonl").read_bytes()).hexdigest()
    saved = json.loads((tmp_path / "out" / "SUBSET.json").read_text())
    assert saved == m and "the first 2 rows of each of its 3 subject values" in m["description"]


def test_subset_cut_keeps_the_other_tasks_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    piqa = [{"id": f"p{i}", "kind": "mc", "context": "goal", "choices": [" a", " b"], "gold": i % 2} for i in range(7)]
    mmlu = [{"id": f"{s}-{i}", "kind": "mc", "subject": s, "context": "Q", "choices": [" A", " B"], "gold": 0}
            for s in ("algebra", "virology") for i in range(4)]
    write_task(src / "piqa.jsonl", piqa)
    write_task(src / "mmlu.jsonl", mmlu)
    m = subset(src, tmp_path / "out", per_task=2, cut=["mmlu"])
    got = {t: [r["id"] for r in data.read_task(tmp_path / "out" / f"{t}.jsonl")] for t in ("piqa", "mmlu")}
    assert got["piqa"] == [r["id"] for r in piqa]  # whole
    assert got["mmlu"] == ["algebra-0", "virology-0"]
    assert m["rows"] == {"mmlu": 2, "piqa": 7}
    assert "--cut mmlu" in m["description"] and "whole splits of piqa" in m["description"]
    with pytest.raises(ValueError, match="--cut names tasks that are not among those written: copa"):
        subset(src, tmp_path / "out2", per_task=2, cut=["copa"])


def test_subset_refusals(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_task(src / "mmlu.jsonl", [{"id": "x", "kind": "mc", "context": "Q", "choices": [" A"], "gold": 0}])
    with pytest.raises(data.TaskDataError, match=r"mmlu.jsonl:1: missing key 'subject'"):
        subset(src, tmp_path / "out", per_task=3)
    with pytest.raises(data.TaskDataError, match="unknown task 'piqa'"):
        subset(src, tmp_path / "out", per_task=3, tasks=["piqa"])
    with pytest.raises(ValueError, match="--per-task must be >= 1"):
        subset(src, tmp_path / "out", per_task=0)
