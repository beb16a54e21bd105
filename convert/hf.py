"""Source: a transformers model directory (config.json + *.safetensors, single file or sharded with an index).

Safetensors files are read with numpy memory maps (the format is an 8-byte header length, a JSON header
and raw little-endian data): no torch needed, bf16 supported through ml_dtypes, and a tensor's bytes are
paged in only when the writer copies them into their row.

Also here: params_from_torch_state_dict, the same name map applied to an in-memory transformers model
(model parity tests).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from convert.names import HF_MAPS, NameMap
from convert.writer import fill_params
from polar_jax.checkpoint import copy_tokenizer_files, has_tokenizer, is_model_dir
from polar_jax.config import ModelConfig, eos_ids, from_hf_config

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """Lazy numpy view of one .safetensors file; every malformed case raises ValueError naming the file."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            if size < 8:
                raise ValueError(f"{size} bytes, too short for a header")
            n = int(np.fromfile(path, "<u8", count=1)[0])
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            header.pop("__metadata__", None)
            self._start = 8 + n
            self.entries = {}
            for name, e in header.items():
                dtype = _ST_DTYPES.get(e["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has unsupported dtype {e['dtype']}")
                begin, end = e["data_offsets"]
                nbytes = math.prod(e["shape"]) * np.dtype(dtype).itemsize
                if end - begin != nbytes or self._start + end > size:
                    raise ValueError(f"tensor {name!r}: data offsets {begin}..{end} do not fit its shape "
                                     f"{e['shape']} or the file size {size} (truncated?)")
                self.entries[name] = (dtype, tuple(e["shape"]), begin, end)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"corrupt safetensors file {path}: {e}") from e
        self._mmap = np.memmap(path, np.uint8, mode="r")

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        return self._mmap[self._start + begin: self._start + end].view(dtype).reshape(shape)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt safetensors index {index}: {e}") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f.name} listed in {index} not found")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin checkpoints are not supported: re-save with save_pretrained)" \
            if any(path.glob("*.bin")) else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    single = path / "model.safetensors"
    if single.is_file() and len(files) > 1:  # what transformers loads; adapters, consolidated copies are not
        others = ", ".join(f.name for f in files if f != single)
        warnings.warn(f"{path}: reading model.safetensors only, as transformers does (also there: {others})",
                      stacklevel=3)
        return [single]
    return files


def read_hf_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if is_model_dir(path):
        raise ValueError(f"{path} is already a polar model directory: LLM, polar generate and polar serve load it "
                         "as it is")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: a HF model directory needs config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {cfg_file}: {e}") from e
    try:
        cfg = from_hf_config(hf, name=path.name)
    except KeyError as e:
        raise ValueError(f"{cfg_file} lacks the field {e.args[0]!r}") from e
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e
    # generation_config.json may name more end tokens (e.g. an instruct model's end of turn): generation
    # stops at any of them there, so it does here too.
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            gen_eos = eos_ids(json.loads(gen_file.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError, ValueError) as e:
            raise ValueError(f"corrupt {gen_file}: {e}") from e
        extra = tuple(i for i in gen_eos if i not in cfg.eos_token_ids)
        if extra:
            cfg = cfg.replace(eos_token_ids=cfg.eos_token_ids + extra)
    return cfg


class HFSource:
    """A transformers model directory, for convert.writer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cfg = read_hf_config(self.path)
        self.name_map: NameMap = HF_MAPS[self.cfg.family]
        self._where: dict[str, SafetensorsFile] = {}
        for f in _safetensors_files(self.path):
            st = SafetensorsFile(f)
            for name in st.entries:
                if name in self._where:
                    raise ValueError(f"tensor {name!r} is stored in both {self._where[name].path.name} and "
                                     f"{f.name} in {self.path}: remove the copy that is not the model's")
                self._where[name] = st

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)  # [out, in] like torch

    def write_tokenizer(self, dest: Path) -> None:
        if not has_tokenizer(self.path):
            warnings.warn(f"{self.path} has no tokenizer files: the converted model will take token ids only "
                          "(generate, serve and eval need a tokenizer)", stacklevel=2)
        copy_tokenizer_files(self.path, dest)


def params_from_torch_state_dict(cfg: ModelConfig, state_dict: dict, dtype=jnp.float32) -> dict:
    """Our params (jax arrays, `dtype`) from a transformers model's state_dict, through the same name map.

    cfg: the ModelConfig matching the model (e.g. from_hf_config(model.config.to_dict())); family "opt" maps
    OPTForCausalLM names, "llama" maps Llama/Mistral/Qwen2ForCausalLM names. Tied lm_head copies are skipped.
        params = params_from_torch_state_dict(cfg, model.state_dict())
    """
    def read(name):
        return state_dict[name].detach().float().cpu().numpy()

    params = fill_params(cfg, HF_MAPS[cfg.family], list(state_dict), read, np.dtype(dtype))
    return jax.tree.map(jnp.asarray, params)
