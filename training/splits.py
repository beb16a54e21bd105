"""Three disjoint splits of collected tokens, derived from the data directory alone (no state to lose).

  train  the router's gradient steps
  val    early stopping (and each layer's choice of its best epoch)
  test   the last TEST_FRAC of every collected token: nothing is fitted or stopped on it, so the router
         metrics reported on it are honest, and `polar calibrate` tunes its MLP top-k on it (tokens
         the router never saw in any role).
Splits are whole windows (seq_len tokens, in collection order), so neighbouring tokens of one window never
land on both sides. The test split depends only on the number of collected tokens, never on --val-frac or
--max-tokens; training takes at most max_tokens from the tokens before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEST_FRAC = 0.1


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # token indices, int64
    val: np.ndarray
    test: np.ndarray

    def ranges(self) -> dict[str, list[int]]:
        """{"train": [start, stop], ...}: each split is one contiguous run of tokens."""
        return {k: [int(v[0]), int(v[-1]) + 1] for k, v in (("train", self.train), ("val", self.val),
                                                            ("test", self.test))}


def range_of_test(n: int, seq_len: int, test_frac: float = TEST_FRAC) -> tuple[int, int]:
    """[start, stop) of the test tokens among n collected tokens (windows of seq_len)."""
    n_win = n // seq_len
    n_test = max(1, int(round(n_win * test_frac)))
    if n_win - n_test < 2:
        raise ValueError(f"{n} collected tokens are {n_win} windows of {seq_len}: too few for train, validation "
                         f"and test windows; collect more tokens")
    return (n_win - n_test) * seq_len, n_win * seq_len


def split(n: int, seq_len: int, val_frac: float, max_tokens: int | None = None,
          test_frac: float = TEST_FRAC) -> Splits:
    """Train / val / test token indices of n collected tokens in windows of seq_len."""
    if not 0 < val_frac < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {val_frac}")
    t0, t1 = range_of_test(n, seq_len, test_frac)
    pool_win = t0 // seq_len if max_tokens is None else min(t0, max_tokens) // seq_len
    n_val = max(1, int(round(pool_win * val_frac)))
    if pool_win - n_val < 1:
        raise ValueError(f"{pool_win} windows of {seq_len} tokens before the test split are too few for "
                         f"training and validation (val_frac {val_frac}, max_tokens {max_tokens})")
    v0 = (pool_win - n_val) * seq_len
    return Splits(np.arange(v0), np.arange(v0, pool_win * seq_len), np.arange(t0, t1))
