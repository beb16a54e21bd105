"""Model directories: save and load (config, params, tokenizer).

A model directory (written by `polar convert` or `save`) holds:
  config.json      our ModelConfig (ModelConfig.to_dict), not a transformers config
  params/          orbax PyTree checkpoint of the parameter pytree (polar_jax/params.py), incl. optional routers
  tokenizer files  as transformers saves them (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...)
  polar-model.json the marker: says this directory was written here (and the params dtype), so that
                   `overwrite=True` replaces only directories we wrote, never a user's own folder

Params are always saved as host numpy arrays, so a checkpoint written on one device kind loads on any other.
Only the stable orbax API (PyTreeCheckpointer) is used: it reads and writes the same format in
orbax-checkpoint 0.12.4 through 0.12.8.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from polar_jax.config import ModelConfig, check_head_dim, load_config
from polar_jax.params import check_params

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
MARKER_FILE = "polar-model.json"
DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}
# Files transformers reads a tokenizer from (any one of the first group makes a tokenizer directory);
# generation_config.json rides along for the sampling defaults it carries.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model")
TOKENIZER_EXTRAS = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")
TOKENIZER_DIRS = ("additional_chat_templates",)


def is_model_dir(path: Path) -> bool:
    """True for a directory written by `save` / `polar convert` (it holds our marker file)."""
    return path.is_dir() and (path / MARKER_FILE).is_file()


def stored_dtype(path: str | Path) -> np.dtype | None:
    """The parameter dtype a model directory's marker records, or None (no marker, or an unreadable one)."""
    try:
        return jnp.dtype(json.loads((Path(path) / MARKER_FILE).read_text())["dtype"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_writable(out: str | Path, *, file: bool = True) -> None:
    """Raise now, not after the work that produces it, if `out` (a file, or a directory with file=False) cannot
    be created: an ancestor is a file, the nearest existing folder is not writable, or a wanted file is an
    existing directory. Creates nothing (missing folders are made by the writer)."""
    out = Path(out)
    if file and out.is_dir():
        raise IsADirectoryError(f"cannot create {out}: it is a directory; name a file")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"cannot create {out}: {parent} is a file, not a directory")
    folder = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {out}: {folder} is not writable")


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Raise unless `out` may be written: it does not exist, or it is one of our model directories and
    overwrite is on. Its folder must be creatable and writable (check_writable)."""
    check_writable(out, file=False)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"output {out} already exists; pass overwrite=True (polar convert --overwrite) "
                              "to replace it")
    if not is_model_dir(out):
        raise FileExistsError(f"refusing to overwrite {out}: it is not a model directory written by polar "
                              f"(no {MARKER_FILE}); remove it yourself or choose another output")


@contextlib.contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory of `out`; rename it to `out` only if the block completes.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `out` is untouched.
    With overwrite, only a model directory we wrote (it has our marker) is replaced; see refuse_existing.
    """
    out = Path(out)
    refuse_existing(out, overwrite)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # folders to remove on failure
    # A plain mkdir (not tempfile.mkdtemp, which makes it 0700) so the model gets the user's umask.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        _remove_empty(made)
        raise OSError(f"cannot create {out}: {e.strerror}") from e
    old = None
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            refuse_existing(out, overwrite)  # again: something may have appeared there meanwhile
            # Move the old one aside first, so `out` is never half old, half new.
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)  # the new one could not take its place: the old one goes back
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    if old is not None:  # the new model is in place; the old copy's removal may fail without undoing that
        try:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        except OSError as e:
            warnings.warn(f"{out} was written, but its previous copy, moved to {old}, could not be removed: {e}",
                          stacklevel=3)


def write_whole(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text (or bytes) to path through a temporary file beside it renamed over it (its folder made if
    missing): a run killed mid-write leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open "x", not tempfile.mkstemp (which makes the file 0600), so the file gets the user's umask.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb" if isinstance(data, bytes) else "x") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders atomic_directory created (deepest first) where they are still empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def copy_tokenizer_files(src: str | Path, dest: str | Path) -> list[str]:
    """Copy the tokenizer files found in `src` into `dest`; returns the names copied."""
    src, dest = Path(src), Path(dest)
    copied = []
    for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
            copied.append(name)
    for name in TOKENIZER_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
            copied.append(name)
    return copied


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def write(path: str | Path, cfg: ModelConfig, params: dict, tokenizer_dir: str | Path | None = None) -> None:
    """Write config, params and tokenizer files into the existing directory `path` (not atomic; see save)."""
    path = Path(path)
    check_params(cfg, params)
    host = jax.tree.map(np.asarray, params)  # device arrays -> host numpy: device-independent checkpoint
    import orbax.checkpoint as ocp  # slow import; only when saving or loading

    ocp.PyTreeCheckpointer().save((path / PARAMS_DIR).absolute(), host)
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)
    marker = {"written_by": "polar-jax", "dtype": str(host["embed"].dtype)}
    (path / MARKER_FILE).write_text(json.dumps(marker) + "\n")


def save(path: str | Path, cfg: ModelConfig, params: dict, tokenizer_dir: str | Path | None = None,
         overwrite: bool = False) -> Path:
    """Save a model directory atomically (a temporary sibling renamed into place).

    params may hold jax or numpy arrays and an optional "routers" subtree. tokenizer_dir: a directory whose
    tokenizer files are copied (it may be `path` itself when overwriting, e.g. to add trained routers).
    """
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write(tmp, cfg, params, tokenizer_dir)
    return Path(path)


def check_model_dir(path: Path) -> None:
    """Raise a one-line error when `path` is not a model directory, saying what it is instead."""
    make = f"make a model directory from it with `polar convert {path} DIR`"
    if path.is_file():
        kind = "a GGUF file" if path.suffix.lower() == ".gguf" else "a file"
        raise ValueError(f"{path} is {kind}, not a polar model directory; {make}")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if is_model_dir(path) or not (path / CONFIG_FILE).is_file():
        return
    try:
        hf = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return  # load_config names the broken file
    if isinstance(hf, dict) and ("architectures" in hf or "model_type" in hf):
        raise ValueError(f"{path} is a transformers (HF) model directory, not a polar model directory; {make}")


def _resolve_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def load_params(path: str | Path, cfg: ModelConfig | None = None, dtype=None) -> dict:
    """The parameter pytree of a model directory, as jax arrays on the default device.

    dtype: None keeps the stored dtype; "bf16" | "fp16" | "fp32" or a dtype casts every floating leaf.
    The tree is checked against the config (polar_jax.params.check_params); a "routers" subtree rides along.
    """
    path = Path(path)
    check_model_dir(path)
    cfg = cfg if cfg is not None else load_config(path / CONFIG_FILE)
    ckpt = path / PARAMS_DIR
    if not ckpt.is_dir():
        raise FileNotFoundError(f"parameter checkpoint not found: {ckpt} (convert the model with `polar convert`)")
    import orbax.checkpoint as ocp

    try:
        host = ocp.PyTreeCheckpointer().restore(ckpt.absolute())
    except Exception as e:  # orbax/tensorstore raise many types; the user needs to know which file is bad
        raise ValueError(f"corrupt or unreadable parameter checkpoint {ckpt}: {type(e).__name__}: {e}") from e
    if not isinstance(host, dict):
        raise ValueError(f"corrupt parameter checkpoint {ckpt}: expected a dict of parameters, got {type(host)}")
    try:
        check_params(cfg, host)
    except ValueError as e:
        raise ValueError(f"{ckpt} does not match {path / CONFIG_FILE}: {e}") from e
    dt = _resolve_dtype(dtype)

    def put(x):
        x = np.asarray(x)
        if dt is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dt)
        return jax.device_put(x)

    return jax.tree.map(put, host)


def load_tokenizer(path: str | Path):
    """transformers.AutoTokenizer of a model directory, or None when it has no tokenizer files."""
    path = Path(path)
    if not has_tokenizer(path):
        return None
    import transformers

    # Our config.json is not a transformers config; AutoTokenizer peeks at it and warns, as FutureWarnings and
    # through its own logger, about fields (rope_scaling) that mean nothing for the tokenizer.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ValueError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)


def load(path: str | Path, dtype=None, *, runnable: bool = True):
    """(config, params, tokenizer) of a model directory written by `polar convert` or `save`.

    tokenizer is a transformers tokenizer, or None when the directory has no tokenizer files. runnable: refuse,
    before the weights load, a model polar's attention kernels cannot run (config.check_head_dim); False reads
    it anyway (to inspect a conversion).
    """
    path = Path(path)
    check_model_dir(path)
    cfg = load_config(path / CONFIG_FILE)
    if runnable:
        check_head_dim(cfg)
    params = load_params(path, cfg, dtype)
    return cfg, params, load_tokenizer(path)
