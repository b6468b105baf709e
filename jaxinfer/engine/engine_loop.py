"""Runs an LLMEngine on a background thread: requests are submitted from any thread and their
outputs delivered to per-request callbacks (called on the engine thread; keep them short).

The thread sleeps on a condition variable while there is no work. Submissions and cancellations are
applied between steps, so a cancelled request's pages are free before the next step is scheduled.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from jaxinfer.engine.engine import LLMEngine
from jaxinfer.engine.request import RequestOutput
from jaxinfer.errors import (EngineUnavailableError, InvalidRequestError, RequestCancelledError,
                             ResourceExhaustedError)
from jaxinfer.sampling import SamplingParams

Callback = Callable[[RequestOutput | Exception], None]
log = logging.getLogger(__name__)


class EngineLoop:

  def __init__(self, engine: LLMEngine):
    self.engine = engine
    self._cv = threading.Condition()
    self._adds: list = []
    self._aborts: list[str] = []
    self._callbacks: dict[str, Callback] = {}
    self._active: set[str] = set()  # ids submitted and not yet finished (guarded by _cv)
    self._accepting = True
    self._stopping = False
    self.failure: Exception | None = None
    self._thread = threading.Thread(target=self._run, name="jaxinfer-engine", daemon=True)

  def start(self) -> EngineLoop:
    self._thread.start()
    return self

  @property
  def healthy(self) -> bool:
    return self._accepting and self.failure is None and self._thread.is_alive()

  @property
  def num_active(self) -> int:
    with self._cv:
      return len(self._active)

  def submit(self, prompt: str | Sequence[int], params: SamplingParams | None,
             callback: Callback, request_id: str | None = None) -> str:
    """Validates (raising InvalidRequestError / PromptTooLongError here, in the caller's thread) and
    queues a request. Raises ResourceExhaustedError when the queue is full and
    EngineUnavailableError when the engine is shutting down or has failed."""
    req = self.engine.make_request(prompt, params, request_id)
    with self._cv:
      if not self._accepting or self.failure is not None:
        raise EngineUnavailableError("the engine is not accepting requests (shutting down)")
      if len(self._active) >= self.engine.config.max_queued_requests:
        raise ResourceExhaustedError(
            f"{len(self._active)} requests in flight; the limit is "
            f"{self.engine.config.max_queued_requests}")
      if req.request_id in self._active:
        raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
      self._active.add(req.request_id)
      self._adds.append((req, callback))
      self._cv.notify_all()
    return req.request_id

  def abort(self, request_id: str) -> None:
    with self._cv:
      self._aborts.append(request_id)
      self._cv.notify_all()

  def wait_idle(self, timeout: float | None = None) -> bool:
    """Blocks until no request is in flight (``timeout`` is a safety bound); True if idle."""
    with self._cv:
      return self._cv.wait_for(lambda: not self._active, timeout)

  def drain(self, timeout: float | None = None) -> bool:
    """Stops accepting requests and waits for those in flight to finish."""
    with self._cv:
      self._accepting = False
    return self.wait_idle(timeout)

  def shutdown(self) -> None:
    """Stops the thread; requests still in flight get EngineUnavailableError."""
    with self._cv:
      self._accepting = False
      self._stopping = True
      self._cv.notify_all()
    if self._thread.is_alive():
      self._thread.join()

  def _done(self, request_id: str, item: RequestOutput | Exception) -> None:
    cb = self._callbacks.pop(request_id, None)
    with self._cv:
      self._active.discard(request_id)
      self._cv.notify_all()
    if cb is not None:
      try:
        cb(item)
      except Exception:  # a consumer's bug must not stop the engine for everyone else
        log.exception("callback of request %s failed", request_id)

  def _deliver(self, out: RequestOutput) -> None:
    cb = self._callbacks.get(out.request_id)
    if cb is None:
      return
    try:
      cb(out)
    except Exception:
      log.exception("callback of request %s failed; cancelling it", out.request_id)
      self.engine.abort(out.request_id)
      self._done(out.request_id, RequestCancelledError("the request's consumer failed"))

  def _run(self) -> None:
    engine = self.engine
    while True:
      with self._cv:
        self._cv.wait_for(lambda: self._adds or self._aborts or self._stopping or
                          engine.has_unfinished())
        adds, self._adds = self._adds, []
        aborts, self._aborts = self._aborts, []
        stopping = self._stopping
      for req, cb in adds:
        self._callbacks[req.request_id] = cb
        engine.add_request(req)
      for rid in aborts:
        if engine.abort(rid):
          self._done(rid, RequestCancelledError(f"request {rid} was cancelled"))
      if stopping:
        for rid in list(self._callbacks):
          engine.abort(rid)
          self._done(rid, EngineUnavailableError("the engine shut down"))
        return
      if not engine.has_unfinished():
        continue
      try:
        outputs = engine.step()
      except Exception as e:
        log.exception("engine step failed")
        with self._cv:
          self.failure = e
          self._accepting = False
        for rid in list(self._callbacks):
          engine.abort(rid)
          self._done(rid, EngineUnavailableError(f"engine step failed: {e}"))
        return
      for out in outputs:
        if out.finished:
          self._done(out.request_id, out)
        else:
          self._deliver(out)
