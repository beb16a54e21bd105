"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

The engine thread sets the gauges after every step and counts tokens; /metrics renders the registry.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

# Seconds; from a few ms (a decode step on a GPU) to a minute (a long queue).
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4, 0.8, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class ServerMetrics:
    def __init__(self, model_name: str, sparsity=None, cfg=None):
        """cfg: the model's ModelConfig (needed with a sparsity config: it gives the KV heads per layer)."""
        self.registry = r = CollectorRegistry()
        self.running = Gauge("polar_requests_running", "Requests being decoded or prefilled", registry=r)
        self.waiting = Gauge("polar_requests_waiting", "Requests queued in the engine", registry=r)
        self.kv_pages_used = Gauge("polar_kv_pages_used", "KV cache pages held by requests", registry=r)
        self.kv_pages_free = Gauge("polar_kv_pages_free", "KV cache pages in the free pool", registry=r)
        self.ttft = Histogram("polar_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("polar_inter_token_latency_seconds", "Time between a request's output tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("polar_e2e_request_latency_seconds", "Arrival to finish", buckets=_TTFT_BUCKETS,
                             registry=r)
        # _sum / _count between two scrapes is the mean decode batch over that interval.
        self.decode_batch = Histogram("polar_decode_batch", "Requests decoded together in one engine step (steps "
                                      "that decoded at least one)", buckets=_BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("polar_prompt_tokens", "Prompt tokens of admitted requests (a prompt once per "
                                     "choice: each choice prefills it)", registry=r)
        self.generation_tokens = Counter("polar_generation_tokens", "Output tokens generated", registry=r)
        self.finished = Counter("polar_requests_finished", "Finished requests by reason", ["reason"], registry=r)
        self.preemptions = Counter("polar_preemptions", "Requests preempted (their KV pages freed, their tokens "
                                   "recomputed later) because the KV pool ran out", registry=r)
        self._preemptions_seen = 0
        self.attn_density = Gauge("polar_attn_density", "Default fraction of attention KV heads kept in decode: "
                                  "the whole heads a layer keeps (its density rounded) over its KV heads, averaged "
                                  "over the layers that select heads (1: dense)", registry=r)
        self.sparsity = Info("polar_sparsity", "The engine's sparsity configuration", registry=r)
        attn = "all" if sparsity is None else sparsity.attn
        density = 1.0 if sparsity is None else sparsity.attn_density
        kept = 1.0
        if sparsity is not None:  # the layers kept dense are not what the config selects
            counts = np.delete(sparsity.head_counts(cfg), list(sparsity.dense_layers))
            kept = float(counts.mean()) / cfg.n_kv_heads if counts.size else 1.0
        self.attn_density.set(kept)
        mlp_k = None if sparsity is None else sparsity.mlp_k
        if sparsity is not None and sparsity.mlp_k_table is not None:  # calibrated: {batch: k per layer}
            mlp_k = {b: list(ks) for b, ks in sparsity.mlp_k_table}
        self.sparsity.info({"model": model_name, "attn": attn, "attn_density": str(density),
                            "mlp": "all" if sparsity is None else sparsity.mlp, "mlp_k": str(mlp_k)})

    def set_engine_state(self, scheduler) -> None:
        bm = scheduler.block_manager
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.kv_pages_free.set(bm.num_free_pages)
        self.kv_pages_used.set(bm.num_usable_pages - bm.num_free_pages)
        self.preemptions.inc(scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = scheduler.num_preemptions

    def render(self) -> bytes:
        return generate_latest(self.registry)
