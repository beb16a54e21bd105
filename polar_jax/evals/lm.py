"""The lm-evaluation-harness model `polar`: loglikelihood through the decode path, generation through LLM.

    lm_eval --model polar \
        --model_args model=models/smollm2-135m-instruct,sparsity=sparsity.json,batch_size=32 \
        --include_path "$(polar eval tasks --print-include-path)" --tasks piqa,arc_easy

Importing this module registers `polar` with lm-eval. lm-eval 0.4 has no plugin discovery for models: a plain
`lm_eval` finds `polar` through polar_lm_eval_plugin (an import hook that an installed polar-jax's .pth file
sets up), and polar_jax.evals.lm_eval_main imports this module itself. Tokenisation follows lm-eval's `hf`
model: context and continuation are encoded together and split at the context's tokens, without special
tokens; an empty context is the prefix token (BOS, else EOS); a too-long request loses tokens from the left of
its context.
"""

from __future__ import annotations

import os
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own table first: its get_model fills it only while the registry is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from polar_jax.evals.loglik import loglikelihood
from polar_jax.sparsity import SparsityConfig, check_routers


# How the messages of parse_sparsity name its three inputs: lm-eval's model_args, or `polar eval tasks`' flags.
_SPARSITY_NAMES = {"model_args": ("sparsity=JSON", "attn=SOURCE,attn_density=X", "attn_density={}", "attn="),
                   "flags": ("--sparsity JSON", "--attn-source/--attn-density", "--attn-density {}", "--attn-source ")}


def parse_sparsity(sparsity, attn: str | None, attn_density, names: str = "model_args") -> SparsityConfig | None:
    """The SparsityConfig of `sparsity` (a config or its JSON path) or of attn + attn_density (None: dense);
    errors name the inputs as `names` says ("model_args" or "flags")."""
    whole, pair, density, source = _SPARSITY_NAMES[names]
    if sparsity is not None and (attn is not None or attn_density is not None):
        raise ValueError(f"pass either {whole} or {pair}, not both")
    if isinstance(sparsity, SparsityConfig):
        return sparsity
    if sparsity is not None:
        return SparsityConfig.from_json(sparsity)
    if attn is None:
        if attn_density is not None:
            raise ValueError(f"{density.format(attn_density)} needs {source}router|oracle|random (the source of the "
                             "kept KV groups); without it the run would be dense")
        return None
    return SparsityConfig(attn=attn, attn_density=1.0 if attn_density is None else float(attn_density))


@register_model("polar")
class PolarLM(TemplateLM):
    """model: a model directory (`polar convert`), or a (ModelConfig, params, tokenizer) tuple.

    sparsity: a SparsityConfig or the path of its JSON; or attn=router|oracle|random with attn_density=X.
    None: dense. batch_size: continuation rows per device call. max_length: context window (default: the
    model's positions). seed: the random head source's draws and sampling's (default: the sparsity config's
    seed, as the serving engine's, else 0).
    """

    backend = "causal"

    def __init__(self, model: str | os.PathLike | tuple = None, sparsity=None, batch_size: int | str = 32,
                 max_length: int | None = None, seed: int | None = None, attn: str | None = None,
                 attn_density: float | None = None, max_batch_size=None, device=None, **kwargs):
        # max_batch_size and device come from lm-eval's CLI; the device is JAX's default one.
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown polar model_args: {', '.join(sorted(kwargs))} (known: model, sparsity, "
                             "attn, attn_density, batch_size, max_length, seed)")
        if model is None:
            raise ValueError("polar needs model=DIR (a model directory written by `polar convert`)")
        if isinstance(model, tuple):
            self.cfg, self.params, self.tokenizer = model
        else:
            from polar_jax.checkpoint import load

            if not Path(model).is_dir():
                raise FileNotFoundError(f"model directory not found: {model}")
            self.cfg, self.params, self.tokenizer = load(Path(model))
        if self.tokenizer is None:
            raise ValueError(f"{model} has no tokenizer files; lm-eval requests are text")
        self.sparsity = parse_sparsity(sparsity, attn, attn_density)
        if self.sparsity is not None:
            where = "the model" if isinstance(model, tuple) else str(model)
            check_routers(self.cfg, self.params, self.sparsity, where=where)
        self.batch_size = 32 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.cfg.max_positions)
        self.seed = int(seed if seed is not None else self.sparsity.seed if self.sparsity is not None else 0)
        self._llm = None

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over the CLI's --batch_size (whose default, 1, is always passed)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's TemplateLM.loglikelihood with the tokenisation batched: every distinct string (the choices
        of a question share a context) encoded once, in one call of the tokenizer's batch encoder. The token ids
        are those of TemplateLM's one-by-one `_encode_pair`: trailing spaces of a context move to its
        continuation, context + continuation is encoded whole and split at the context's length, and an empty
        context becomes the prefix token."""
        pairs = [req.args for req in requests]
        plans = []  # per request: (context as encoded or None when empty, the whole string encoded)
        for context, continuation in pairs:
            if context == "":
                plans.append((None, continuation))
                continue
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            plans.append((context, context + continuation))
        texts = list(dict.fromkeys(t for plan in plans for t in plan if t is not None))
        enc = dict(zip(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
        new_reqs = []
        for pair, (context, whole) in zip(pairs, plans):
            if context is None:
                cont = enc[whole]
                ctx_enc, cont_enc = (([self.prefix_token_id], cont) if self.prefix_token_id != cont[0]
                                     else (cont[:1], cont[1:]))
            else:
                ctx_enc = enc[context]
                cont_enc = enc[whole][len(ctx_enc):]
            new_reqs.append((pair, ctx_enc, cont_enc))
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for _, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            keep = self.max_length + 1 - len(cont)  # lm-eval's hf model: the last max_length + 1 tokens
            pairs.append((ctx[-keep:], cont))
        out = loglikelihood(self.cfg, self.params, pairs, sparsity=self.sparsity, batch_size=self.batch_size,
                            seed=self.seed, progress=not disable_tqdm)
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of token log-likelihoods of each whole text, in disjoint windows of max_length (lm-eval's rule)."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) generation through the serving engine (polar_jax.llm.LLM)."""
        from polar_jax.engine.sampling_params import SamplingParams
        from polar_jax.llm import LLM

        if not requests:
            return []
        if self._llm is None:
            self._llm = LLM((self.cfg, self.params, self.tokenizer), sparsity=self.sparsity,
                            max_num_seqs=self.batch_size, max_model_len=self.max_length, progress=False)
        prompts, params = [], []
        for req in requests:
            context, gen = req.args
            gen = dict(gen or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen.pop("max_gen_toks", 256))
            sample = bool(gen.pop("do_sample", False))
            temperature = float(gen.pop("temperature", 1.0 if sample else 0.0))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]  # room for the generation
            prompts.append(ids)
            params.append(SamplingParams(temperature=temperature if sample else 0.0, max_tokens=max_new,
                                         stop=tuple(until), seed=self.seed))
        outs = self._llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        texts = [o.text for o in outs]
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
