"""Data parallelism through the serving engine: ``dp`` independent replicas, one ``LLMEngine`` each.

``ParallelConfig(dp=N, tp=..., pp=...)`` on N*n devices (n = pp*ep*tp): replica r is the model
sharded with the config's pp/ep/tp on the r-th dp slice of ``make_mesh``'s grid (devices
[r*n, (r+1)*n)), with its own KV cache, scheduler and compiled step. The replicas share nothing, so
no collective crosses them and each step is exactly what one replica alone would compute.

``DataParallelEngine`` has the ``LLMEngine`` surface that ``LLM`` drives (make_request, add_request,
abort, step, has_unfinished, num_unfinished, run_to_completion). A new request goes to the replica
with the fewest unfinished requests (ties: the lowest index); ``step()`` steps every replica that
has work. Each replica's step is dispatched asynchronously before the previous one's tokens are
read (the engine's async scheduling), so the replicas' device work overlaps; their host work
(scheduling, batch building, detokenizing) runs one after another in the caller's thread.

The alternative, one engine over one batch split by dp, would need the scheduler to keep each
sequence's pages inside its replica's share of the cache; independent replicas need no engine
change and also balance load across requests of different lengths.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxinfer.engine import EngineConfig, LLMEngine, RequestOutput
from jaxinfer.engine.request import Request
from jaxinfer.loader import LoadedModel
from sharding.config import ParallelConfig
from sharding.model import ShardedModel, shard_model


def replica_devices(parallel: ParallelConfig, devices=None) -> list[list]:
  """The devices of each dp replica: the dp slices of ``parallel.make_mesh(devices)``."""
  grid = parallel.make_mesh(devices).devices   # [dp, pp, ep, tp]
  return [list(grid[r].flat) for r in range(parallel.dp)]


def shard_replicas(model: LoadedModel, parallel: ParallelConfig, devices=None) -> list[ShardedModel]:
  """One ``shard_model`` per dp replica, each on its own devices with ``dp=1``."""
  parallel.validate(model.config, None if devices is None else len(devices))
  one = dataclasses.replace(parallel, dp=1)
  return [shard_model(model, one, devices=d) for d in replica_devices(parallel, devices)]


class DataParallelEngine:
  """dp ``LLMEngine`` replicas behind one engine interface (see the module docstring)."""

  def __init__(self, engines: Sequence[LLMEngine]):
    if not engines:
      raise ValueError("DataParallelEngine needs at least one engine")
    self.engines = list(engines)
    self._owner: dict[str, LLMEngine] = {}

  @classmethod
  def from_replicas(cls, models: Sequence[LoadedModel], config: EngineConfig = EngineConfig(),
                    **kw) -> DataParallelEngine:
    return cls([LLMEngine.from_loaded(m, config, **kw) for m in models])

  def make_request(self, prompt, params=None, request_id: str | None = None) -> Request:
    """Validates and tokenizes (every replica has the same model and limits)."""
    return self.engines[0].make_request(prompt, params, request_id)

  def add_request(self, request, params=None, request_id: str | None = None) -> str:
    if not isinstance(request, Request):
      request = self.make_request(request, params, request_id)
    engine = min(self.engines, key=lambda e: e.num_unfinished)
    rid = engine.add_request(request)
    self._owner[rid] = engine
    return rid

  def abort(self, request_id: str) -> bool:
    engine = self._owner.pop(request_id, None)
    return engine is not None and engine.abort(request_id)

  def has_unfinished(self) -> bool:
    return any(e.has_unfinished() for e in self.engines)

  @property
  def num_unfinished(self) -> int:
    return sum(e.num_unfinished for e in self.engines)

  def replica_of(self, request_id: str) -> int | None:
    """Index of the replica serving a request (None once it has finished)."""
    engine = self._owner.get(request_id)
    return None if engine is None else self.engines.index(engine)

  def step(self) -> list[RequestOutput]:
    outputs = []
    for engine in self.engines:
      if engine.has_unfinished():
        outputs += engine.step()
    for out in outputs:
      if out.finished:
        self._owner.pop(out.request_id, None)
    return outputs

  # Steps until every request has finished (only uses has_unfinished and step).
  run_to_completion = LLMEngine.run_to_completion
