"""Kernel configs that follow the device: a tuned table entry when one exists, else the kernel's heuristic.

A kernel's config function (attention_config, paged_attention_config, up_config, down_config,
fused_config) calls `config_for(kernel, shape, heuristic)`; each kernel module registers its `Tunable`
under the name it passes ("selective_mlp_fused" for the fused MLP of selective_gemm/fused.py). The key is (device kind, kernel name, shape class): the shape
class buckets the dims that matter (each kernel's `bucket`, documented where it is registered; batch,
cache length and neuron count are rounded up with `coarse`, the other dims are exact), so one entry
serves every shape of its class. Lookup order:

  1. the in-process memo;
  2. the user cache: $POLAR_TUNE_DIR/<device>.json, else ~/.cache/polar-jax/tune/<device>.json;
  3. the shipped table: pallas_kernels/tuned/<device>.json (package data);
  4. POLAR_AUTOTUNE=1 only: time the kernel's candidates now (in a worker thread, so even a call from
     inside a jit trace measures concrete inputs), and write the winner to the user cache;
  5. the heuristic, unchanged.

Without POLAR_AUTOTUNE=1 nothing is ever timed on a user's call: tuning ahead of time is `polar tune`.
A cache or table file that is not valid JSON, or of another format version, is ignored with one warning
naming it. Files are written whole (temp file + rename), so a reader never sees half of one.

File format (user cache and shipped table alike):
  {"version": 1, "device": "<device kind>",
   "entries": {"<kernel>|<shape class>": {"config": {field: value}, "ms": best, "heuristic_ms": ...,
                                           "timings": [[{config}, ms or null], ...]}}}
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

VERSION = 1
TABLE_DIR = Path(__file__).resolve().parent / "tuned"
ROTATE_BYTES = 200 << 20  # input bytes rotated through per timing: 4x the 50 MB L2 of an H100 / H200


@dataclasses.dataclass(frozen=True)
class Tunable:
    """What the tuner needs to know of one kernel.

    bucket(**shape) -> the shape class (a dict of ints / strings; also the shape the candidates are timed at).
    candidates(**shape class) -> configs to try, the heuristic's first.
    make_inputs(shape class, key) -> fresh random inputs;  run(config, inputs, interpret) -> the kernel's output.
    """
    name: str
    config_cls: type
    bucket: Callable[..., dict]
    candidates: Callable[..., list]
    make_inputs: Callable[[dict, Any], Any]
    run: Callable[[Any, Any, bool], Any]


KERNELS: dict[str, Tunable] = {}
_memo: dict[tuple, Any] = {}
_files: dict[Path, dict] = {}   # path -> its entries, read once per process


def register(t: Tunable) -> None:
    KERNELS[t.name] = t


def coarse(n: int) -> int:
    """n rounded up to a power of two or 1.5 x a power of two (48 -> 48, 49 -> 64, 2000 -> 2048)."""
    n = max(1, int(n))
    p = 1 << (n - 1).bit_length()          # smallest power of two >= n
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def device_kind() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", None) or d.platform


def _slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def user_file(device: str) -> Path:
    root = os.environ.get("POLAR_TUNE_DIR") or Path.home() / ".cache" / "polar-jax" / "tune"
    return Path(root).expanduser() / f"{_slug(device)}.json"


def table_file(device: str) -> Path:
    return TABLE_DIR / f"{_slug(device)}.json"


def class_key(kernel: str, shape_class: dict) -> str:
    return kernel + "|" + ",".join(f"{k}={v}" for k, v in shape_class.items())


def read_entries(path: Path) -> dict:
    """The entries of a cache or table file; {} (with one warning) when it is unreadable or foreign."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"ignoring kernel tuning file {path}: {e}", stacklevel=2)
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        warnings.warn(f"ignoring kernel tuning file {path}: not valid JSON ({e.msg} at line {e.lineno}); "
                      f"delete it or rerun `polar tune`", stacklevel=2)
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
        found = data.get("version") if isinstance(data, dict) else type(data).__name__
        warnings.warn(f"ignoring kernel tuning file {path}: format version {found!r}, expected {VERSION}; "
                      f"delete it or rerun `polar tune`", stacklevel=2)
        return {}
    return data["entries"]


def _entries(path: Path) -> dict:
    if path not in _files:
        _files[path] = read_entries(path)
    return _files[path]


def _config(t: Tunable, entry) -> Any:
    """The config of a table entry; None (with a warning) if its fields do not fit the kernel's config."""
    try:
        return t.config_cls(**entry["config"])
    except (TypeError, KeyError) as e:
        warnings.warn(f"ignoring tuning entry for {t.name} ({e}); the heuristic is used", stacklevel=3)
        return None


def config_for(kernel: str, shape: dict, heuristic: Callable[[], Any]) -> Any:
    """The config for `kernel` at `shape` (the config function's arguments): see the module docstring."""
    t = KERNELS[kernel]
    device = device_kind()
    ck = class_key(kernel, t.bucket(**shape))
    memo_key = (device, ck)
    if memo_key in _memo:
        return _memo[memo_key]
    cfg = None
    for path in (user_file(device), table_file(device)):
        entry = _entries(path).get(ck)
        if entry is not None:
            cfg = _config(t, entry)
            if cfg is not None:
                break
    if cfg is None and os.environ.get("POLAR_AUTOTUNE") == "1":
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:   # a fresh thread: outside any jit trace
                result = pool.submit(tune, kernel, shape).result()
        except Exception as e:  # noqa: BLE001  (tuning must not break the call it serves)
            warnings.warn(f"POLAR_AUTOTUNE: tuning {ck} failed ({type(e).__name__}: {e}); the heuristic is used",
                          stacklevel=3)
        else:
            cfg = result["best"]
            save(user_file(device), device, {ck: result["entry"]})
    if cfg is None:
        cfg = heuristic()
    _memo[memo_key] = cfg
    return cfg


def clear() -> None:
    """Forget the memo and the files read (after a cache or table changed on disk)."""
    _memo.clear()
    _files.clear()


# ---------------------------------------------------------------------------------------------------
# timing

def time_fn(fn, arg_sets, *, inner: int = 20, reps: int = 15, warmup: int = 3) -> float:
    """Median per-call milliseconds (wall clock) of fn(*args), rotating over arg_sets (a list of arg tuples).

    Each sample dispatches `inner` calls back to back and blocks once, so launch latency overlaps device
    work (as a serving loop would)."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(inner):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e3)
    return statistics.median(samples)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _input_sets(t: Tunable, shape_class: dict, seed: int = 0) -> list:
    """Fresh random input sets of a shape class, drawn until they hold ROTATE_BYTES (at least 2, at most 16;
    2 in interpret mode), so that no call of a chain over them finds its operands in L2."""
    key = jax.random.key(seed)
    sets = [t.make_inputs(shape_class, jax.random.fold_in(key, 0))]
    set_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(sets[0]))
    most = 2 if _interpret() else 16   # interpret mode (tests): L2 means nothing, each set costs compile time
    while len(sets) < min(most, max(2, -(-ROTATE_BYTES // max(1, set_bytes)))):
        sets.append(t.make_inputs(shape_class, jax.random.fold_in(key, len(sets))))
    return sets


def _chain(t: Tunable, cfg):
    """One jitted function calling the kernel once per input set (as the benchmarks' chains do), so the
    host's dispatch is paid once per len(sets) kernels."""
    interpret = _interpret()
    return jax.jit(lambda all_sets: [t.run(cfg, a, interpret) for a in all_sets])


def measure(t: Tunable, cfg, shape_class: dict, *, reps: int, inner: int, seed: int = 0,
            expect=None) -> tuple[float, Any]:
    """(median ms per kernel call, output on the first input set) of one config on fresh random inputs
    of the shape class (_input_sets, _chain).

    With `expect` (the first candidate's output), an output that differs from it raises ValueError: a config
    that computes something else is never kept, however fast."""
    sets = _input_sets(t, shape_class, seed)
    fn = _chain(t, cfg)
    out = np.asarray(jax.device_get(fn(sets)[0]), np.float32)
    if expect is not None:
        err = float(np.max(np.abs(out - expect)))
        tol = 2e-2 * max(1.0, float(np.max(np.abs(expect))))  # half-precision outputs, f32 accumulation
        if not err <= tol:
            raise ValueError(f"output differs from the first candidate's by {err:.3g} (tolerance {tol:.3g})")
    return time_fn(fn, [(sets,)], inner=inner, reps=reps, warmup=1) / len(sets), out


def head_to_head(kernel: str, shape: dict, configs, *, rounds: int = 5, reps: int = 7, inner: int = 10,
                 timer: Callable | None = None) -> list[float]:
    """Median ms per call of each config, timed in alternation (A, B, A, B, ...) for `rounds` rounds on the
    same inputs, every program compiled first.

    For comparing two configs fairly: drift of the GPU's clocks hits both alike, and neither is the fastest
    of many noisy timings (a re-tune's minimum is biased low by its number of candidates). timer(tunable,
    config, shape class) -> ms replaces the measurement (tests)."""
    t = KERNELS[kernel]
    sc = t.bucket(**shape)
    if timer is None:
        sets = _input_sets(t, sc)
        fns = {cfg: _chain(t, cfg) for cfg in configs}
        for fn in fns.values():
            jax.block_until_ready(fn(sets))

        def timer(tt, cfg, s):
            return time_fn(fns[cfg], [(sets,)], inner=inner, reps=reps, warmup=1) / len(sets)
    samples = {cfg: [] for cfg in configs}
    for _ in range(rounds):
        for cfg in configs:
            samples[cfg].append(float(timer(t, cfg, sc)))
    return [statistics.median(samples[cfg]) for cfg in configs]


def parse_class_key(ck: str) -> tuple[str, dict]:
    """(kernel, shape class) of a class key; the class is also a shape of itself (bucketing is idempotent)."""
    kernel, _, dims = ck.partition("|")
    shape = {}
    for item in dims.split(","):
        name, _, value = item.partition("=")
        shape[name] = int(value) if value.lstrip("-").isdigit() else value
    return kernel, shape


def tune(kernel: str, shape: dict, *, max_candidates: int | None = None, reps: int = 7, inner: int = 10,
         timer: Callable | None = None, log=print, extra: tuple = ()) -> dict:
    """Time the candidates of `kernel` at the shape class of `shape`.

    Returns {"key", "best" (config), "entry" (what the cache stores)}. A config the backend rejects, or
    whose output differs from the first candidate's that ran (normally the heuristic's), is skipped with
    one line on `log`. `extra` configs are timed after the candidates (a shipped entry being checked).
    timer(tunable, config, shape class) -> ms replaces the measurement (tests)."""
    t = KERNELS[kernel]
    sc = t.bucket(**shape)
    cands = list(dict.fromkeys([*t.candidates(**sc)[:max_candidates], *extra]))
    if timer is None:
        first = []  # the output of the first candidate that ran, which every later one must reproduce

        def timer(tt, cfg, s):
            ms, out = measure(tt, cfg, s, reps=reps, inner=inner, expect=first[0] if first else None)
            first.append(out)
            return ms
    timings = []
    for cfg in cands:
        try:
            ms = float(timer(t, cfg, sc))
        except Exception as e:  # noqa: BLE001  (a config the backend rejects: say so in one line, go on)
            first_line = str(e).splitlines()[0][:200] if str(e) else ""
            log(f"{class_key(kernel, sc)}: skipped {cfg}: {type(e).__name__}: {first_line}")
            ms = None
        timings.append((cfg, ms))
    done = [(c, ms) for c, ms in timings if ms is not None]
    if not done:
        raise RuntimeError(f"every candidate config of {class_key(kernel, sc)} failed")
    best, best_ms = min(done, key=lambda cm: cm[1])
    entry = {"config": dataclasses.asdict(best), "ms": best_ms, "heuristic_ms": timings[0][1],
             "timings": [[dataclasses.asdict(c), ms] for c, ms in timings]}
    return {"key": class_key(kernel, sc), "best": best, "entry": entry}


# ---------------------------------------------------------------------------------------------------
# writing

def write_table(path: Path, device: str, entries: dict) -> None:
    """Write a whole table file atomically: a temp file in the same folder, then a rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": VERSION, "device": device, "entries": dict(sorted(entries.items()))}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(path: Path, device: str, new: dict) -> None:
    """Merge `new` entries into the file at `path` and into what this process has read of it."""
    path = Path(path)
    entries = {**_entries(path), **new}   # a bad file was warned about when read; it is replaced
    write_table(path, device, entries)
    _files[path] = entries
    for ck in new:
        _memo.pop((device, ck), None)
