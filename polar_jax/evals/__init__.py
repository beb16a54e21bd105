"""Accuracy on standard tasks through the sparse decode path (lm-evaluation-harness).

data.py      task files (../shared/evals schema) and each task's lm-eval config
loglik.py    decode-mode log-likelihood on token ids (dense prefill, teacher-forced sparse decode steps)
lm.py        the lm-eval model `polar` (needs the `eval` extra: pip install 'polar-jax[eval]')
run.py       evaluate tasks through lm-eval's evaluator; tables of results
cli.py       `polar eval tasks`
lm_eval_main.py  `python -m polar_jax.evals.lm_eval_main` = lm-eval's CLI with `polar` registered
tasks/       lm-eval YAML tasks for `--include_path`
"""
