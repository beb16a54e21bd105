"""Doc functions of the YAML tasks beside this file (lm-eval loads them with `!function utils.NAME`).

Importing polar_jax.evals.lm also registers the `polar` model with lm-eval.
"""

from polar_jax.evals import lm  # noqa: F401  (registers `polar`)
from polar_jax.evals.data import dataset, doc_to_choice, doc_to_target, doc_to_text  # noqa: F401
