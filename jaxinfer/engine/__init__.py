"""Serving engine: paged KV cache with a block allocator, continuous batching with chunked prefill,
recompute preemption, one jitted step over bucketed shapes, Prometheus metrics."""
from jaxinfer.engine.block_allocator import BlockAllocator
from jaxinfer.engine.engine import EngineConfig, LLMEngine
from jaxinfer.engine.engine_loop import EngineLoop
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.engine.request import FinishReason, Request, RequestOutput, RequestStatus
from jaxinfer.engine.scheduler import Scheduler

__all__ = ["BlockAllocator", "EngineConfig", "EngineLoop", "EngineMetrics", "FinishReason",
           "LLMEngine", "Request", "RequestOutput", "RequestStatus", "Scheduler"]
