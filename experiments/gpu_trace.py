"""Reading GPU kernel time out of a ``jax.profiler.trace`` folder (shared by the bench scripts)."""
from __future__ import annotations

import glob
import os


def load_trace(trace_dir: str):
  """The newest ``*.xplane.pb`` under trace_dir as a ``jax.profiler.ProfileData``, or None."""
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  return ProfileData.from_file(files[-1]) if files else None


def gpu_kernel_events(pd) -> tuple[dict[str, list], list[tuple[int, int]], list[str]]:
  """Kernel name -> [total ns, count], the (start, end) ns interval of every kernel, and the GPU
  planes' line names. Only the "Stream" lines are read when there are any (other lines repeat
  the same kernels in other groupings)."""
  kernels: dict[str, list] = {}
  intervals, lines = [], []
  planes = [p for p in pd.planes if p.name.startswith("/device:GPU")]
  streams_only = any(ln.name.startswith("Stream") for p in planes for ln in p.lines)
  for plane in planes:
    for line in plane.lines:
      lines.append(line.name)
      if streams_only and not line.name.startswith("Stream"):
        continue
      for ev in line.events:
        k = kernels.setdefault(ev.name, [0.0, 0])
        k[0] += ev.duration_ns
        k[1] += 1
        intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns))
  intervals.sort()
  return kernels, intervals, lines


def busy_ns(intervals: list[tuple[int, int]]) -> float:
  """Length of the union of sorted intervals: the time the GPU ran at least one kernel."""
  if not intervals:
    return 0.0
  busy, cur_s, cur_e = 0.0, *intervals[0]
  for s, e in intervals[1:]:
    if s > cur_e:
      busy += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  return busy + cur_e - cur_s
