"""Prometheus metrics of one engine, in a registry of its own (several engines can live in a process).

Names: jaxinfer_queue_length, jaxinfer_running_requests, jaxinfer_kv_pages_used / _total,
jaxinfer_time_to_first_token_seconds, jaxinfer_time_per_output_token_seconds (histograms),
jaxinfer_step_seconds, and counters of requests by finish reason, preemptions, prompt and generated
tokens.
"""
from __future__ import annotations

import prometheus_client as prom

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                    5.12, 10.24, 20.48, 40.96)


class EngineMetrics:

  def __init__(self, registry: prom.CollectorRegistry | None = None):
    self.registry = registry if registry is not None else prom.CollectorRegistry()
    r = self.registry
    self.queue_length = prom.Gauge("jaxinfer_queue_length", "Requests waiting (incl. preempted)",
                                   registry=r)
    self.running = prom.Gauge("jaxinfer_running_requests", "Requests holding KV pages", registry=r)
    self.kv_pages_used = prom.Gauge("jaxinfer_kv_pages_used", "KV-cache pages in use", registry=r)
    self.kv_pages_total = prom.Gauge("jaxinfer_kv_pages_total", "KV-cache pages usable", registry=r)
    self.ttft = prom.Histogram("jaxinfer_time_to_first_token_seconds", "Arrival to first token",
                               buckets=_LATENCY_BUCKETS, registry=r)
    self.tpot = prom.Histogram("jaxinfer_time_per_output_token_seconds",
                               "Mean gap between a request's output tokens after the first",
                               buckets=_LATENCY_BUCKETS, registry=r)
    self.step_time = prom.Histogram("jaxinfer_step_seconds", "Wall time of one engine step",
                                    buckets=_LATENCY_BUCKETS, registry=r)
    self.finished = prom.Counter("jaxinfer_requests_finished", "Finished requests",
                                 ["reason"], registry=r)
    self.preemptions = prom.Counter("jaxinfer_preemptions", "Requests preempted for recompute",
                                    registry=r)
    self.prompt_tokens = prom.Counter("jaxinfer_prompt_tokens", "Prompt tokens admitted", registry=r)
    self.generated_tokens = prom.Counter("jaxinfer_generated_tokens", "Tokens generated",
                                         registry=r)

  def exposition(self) -> bytes:
    """The registry in Prometheus text format."""
    return prom.generate_latest(self.registry)
