"""Host-side bookkeeping of the serving engine (pure Python, no JAX): requests, pages, scheduling, text."""

from polar_jax.engine.block_manager import BlockManager
from polar_jax.engine.detokenizer import Detokenizer
from polar_jax.engine.sampling_params import SamplingParams
from polar_jax.engine.scheduler import PrefillChunk, ScheduledBatch, Scheduler, SchedulerConfig
from polar_jax.engine.sequence import RequestError, Sequence, SequenceStatus, Timings

__all__ = ["BlockManager", "Detokenizer", "PrefillChunk", "RequestError", "SamplingParams", "ScheduledBatch",
           "Scheduler", "SchedulerConfig", "Sequence", "SequenceStatus", "Timings"]
