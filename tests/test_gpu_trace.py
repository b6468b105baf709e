"""experiments.gpu_trace: kernel totals and busy time from a profile's planes (synthetic planes)."""
from types import SimpleNamespace as NS

from experiments.gpu_trace import busy_ns, gpu_kernel_events


def _ev(name, start, dur):
  return NS(name=name, start_ns=start, duration_ns=dur)


def test_busy_is_the_union_of_intervals():
  assert busy_ns([]) == 0.0
  assert busy_ns([(0, 10), (5, 12), (20, 25), (21, 22)]) == 12 + 5
  assert busy_ns([(0, 4), (4, 6)]) == 6


def test_kernel_events_read_stream_lines_only_when_present():
  gpu = NS(name="/device:GPU:0", lines=[
      NS(name="Stream #13(compute)", events=[_ev("gemm.1", 0, 10), _ev("gemm.1", 30, 10)]),
      NS(name="XLA Ops", events=[_ev("dot", 0, 10)])])          # the same work, grouped by op
  host = NS(name="/host:CPU", lines=[NS(name="python", events=[_ev("step", 0, 100)])])
  kernels, intervals, lines = gpu_kernel_events(NS(planes=[host, gpu]))
  assert kernels == {"gemm.1": [20.0, 2]}
  assert intervals == [(0, 10), (30, 40)]
  assert lines == ["Stream #13(compute)", "XLA Ops"]
  no_streams = NS(name="/device:GPU:0", lines=[NS(name="Kernels", events=[_ev("k", 5, 1)])])
  assert gpu_kernel_events(NS(planes=[no_streams]))[0] == {"k": [1.0, 1]}
