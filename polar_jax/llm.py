"""The offline API, in the shape users know from vLLM.

    from polar_jax import LLM, SamplingParams
    llm = LLM("models/smollm2-135m-instruct")
    for out in llm.generate(["The capital of France is", "def fib(n):"], SamplingParams(max_tokens=32)):
        print(out.text)

`generate` submits every prompt at once to the continuous-batching engine and returns one RequestOutput
per prompt, in order; `stream` yields each step's RequestOutputs (new_token_ids / new_text) as they come.
"""

from __future__ import annotations

import itertools
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Sequence

from polar_jax.engine.llm_engine import LLMEngine, RequestOutput
from polar_jax.engine.sampling_params import SamplingParams
from polar_jax.engine.sequence import RequestError
from polar_jax.sparsity import SparsityConfig

Prompt = str | Sequence[int]


class LLM:
    """A model directory (written by `polar convert`) served by the engine.

    model: a model directory, or a (ModelConfig, params, tokenizer) tuple. sparsity: a SparsityConfig or the
    path of its JSON (`polar calibrate`); None: dense. The other keywords go to LLMEngine (max_num_seqs,
    max_model_len, kv_memory_fraction, num_pages, page_size, prefill_chunk, max_num_batched_tokens,
    batch_invariant, ...).
    """

    def __init__(self, model: str | os.PathLike | tuple, sparsity: SparsityConfig | str | os.PathLike | None = None,
                 **engine_kwargs):
        if isinstance(model, tuple):
            cfg, params, tokenizer = model
        else:
            from polar_jax.checkpoint import load

            cfg, params, tokenizer = load(Path(model))
        if sparsity is not None and not isinstance(sparsity, SparsityConfig):
            sparsity = SparsityConfig.from_json(sparsity)
        self.engine = LLMEngine(cfg, params, tokenizer, sparsity=sparsity, **engine_kwargs)
        self.tokenizer = tokenizer
        self._ids = itertools.count()
        # Outputs an engine step made for another call's requests (streams used side by side) until that call
        # takes them, and the requests of calls still running.
        self._unclaimed: list[RequestOutput] = []
        self._live: set[str] = set()

    def _submit(self, prompts: Prompt | Sequence[Prompt], params) -> list[str]:
        if hasattr(prompts, "tolist"):  # a numpy / jax array of token ids: [T] one prompt, [N, T] N prompts
            prompts = prompts.tolist()
        # a flat list of numbers is one prompt (floats too: the engine refuses them by name, as bytes and dicts)
        one = isinstance(prompts, (str, bytes, bytearray, Mapping))
        if one or (prompts and isinstance(prompts[0], numbers.Number)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given: pass at least one prompt")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt")
        ids = [f"req-{next(self._ids)}" for _ in prompts]
        added = []
        try:
            for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params)):
                try:
                    self.engine.add_request(rid, prompt, p)
                except RequestError as e:  # the prompt's number, not the engine's request id
                    raise RequestError(rid, e.reason, e.field, name=f"prompt {i}") from None
                except (ValueError, TypeError) as e:
                    raise type(e)(f"prompt {i}: {e}") from None
                added.append(rid)
        except BaseException:
            for rid in added:  # all or nothing: the valid prompts of a rejected call do not linger
                self.engine.abort_request(rid)
            raise
        self._live.update(ids)
        return ids

    def _outputs(self, ids) -> list[RequestOutput]:
        """The next outputs of the requests `ids`: those another call's step made for them, else one step's
        (whose outputs for other calls' requests wait in _unclaimed)."""
        mine = [out for out in self._unclaimed if out.request_id in ids]
        if mine:
            self._unclaimed = [out for out in self._unclaimed if out.request_id not in ids]
            return mine
        outs = self.engine.step()
        if not outs and not self.engine.has_unfinished():
            raise RuntimeError(f"the engine has nothing left to run but {len(ids)} request(s) of this call did "
                               "not finish (aborted through the engine?)")
        self._unclaimed += [out for out in outs if out.request_id in self._live and out.request_id not in ids]
        return [out for out in outs if out.request_id in ids]

    def _end(self, ids) -> None:
        """A call is over: cancel its requests that are left and forget them."""
        for rid in ids:
            self.engine.abort_request(rid)
        self._live.difference_update(ids)
        self._unclaimed = [out for out in self._unclaimed if out.request_id not in ids]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield RequestOutputs step by step until every prompt has finished (request_id "req-N"). Streams may be
        read side by side (and generate called between reads): each gets every output of its own requests."""
        ids = set(self._submit(prompts, sampling_params))
        left = set(ids)
        try:
            while left:
                for out in self._outputs(left):
                    yield out
                    if out.finished:
                        left.discard(out.request_id)
        finally:  # a consumer that stops early cancels what is left
            self._end(ids)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One final RequestOutput per prompt, in the prompts' order."""
        ids = self._submit(prompts, sampling_params)
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        try:
            while any(r is None for r in results):
                for out in self._outputs(order):
                    if out.finished:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self._end(ids)
        return results
