"""The small kernels of the FP8 serving path (kernels/fp8_act_quant.py, kernels/add_rms_norm.py)
at Llama-3-8B serving shapes: tilings of the current kernels against a baseline copy of the
kernels (``--old_dir``, e.g. the last committed files), on fresh random inputs.

Per case and variant: bit-compare with the baseline (fraction of differing codes / scales / sums),
the error of the dequantized codes against a float64 NumPy reference (max |deq - ref| / max |ref|,
and the scale's relative error), and GPU time per call from a profiler trace (``--argsets``
independent input sets per jit, each its own buffers, so the inputs are not all L2-resident).

  python experiments/bench_small_kernels.py --cases=silu64,silu1024 --out=/tmp/small.json
  python experiments/bench_small_kernels.py --interpret --small   # CPU smoke run (tiny shapes)
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import app, flags

_CASES = flags.DEFINE_list("cases", ["silu64", "silu1024", "norm64", "rows64", "norm1024",
                                     "rows1024"], "cases to run, in order")
_VARIANTS = flags.DEFINE_string("variants", "", "case=tiling;tiling|case=... overrides (tiling: "
                                "rows,num_warps,split[,reload] or 'default')")
_OLD_DIR = flags.DEFINE_string("old_dir", "gpu_jobs/probe", "folder with the baseline kernels "
                               "(dsmall_old_act.py, dsmall_old_norm.py); '' to skip")
_ARGSETS = flags.DEFINE_integer("argsets", 4, "independent input sets per timed jit")
_CHECK_ALL = flags.DEFINE_bool("check_all", False, "bit-compare every input set (not only the "
                                "first) with the baseline: differ_all = fraction of differing "
                                "codes / scales over all of them")
_CALLS = flags.DEFINE_integer("calls", 5, "traced calls of the jit (0: no trace, e.g. under ncu)")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke runs)")
_SMALL = flags.DEFINE_bool("small", False, "tiny shapes (smoke runs)")
_BUDGET = flags.DEFINE_float("budget_s", 120.0, "stop starting cases past this")
_OUT = flags.DEFINE_string("out", "/tmp/bench_small_kernels.json", "JSON output")

# Tilings per case: (rows, num_warps, split, reload[, interleave]); None = the module default;
# (0, C): the Mosaic GPU cluster kernels (kernels/fp8_act_quant_mgpu.py, add_rms_norm_mgpu.py),
# C CTAs per row; (0, C, 1): the same with plain global loads / stores (ClusterTiling.direct).
VARIANTS = {
    "silu64": [None, (0, 4), (0, 8), (1, 8, 2, 0), (1, 4, 4, 0), (1, 4, 8, 0)],
    "silu1024": [None, (0, 4), (2, 16, 1, 0), (4, 16, 1, 1), (2, 8, 1, 1), (4, 32, 1, 0)],
    "rows64": [None, (0, 4), (0, 8), (1, 4, 2, 0)],
    "rows1024": [None, (2, 4, 1, 0), (4, 8, 1, 0)],
    "norm64": [None, (0, 4), (0, 8), (1, None, 2, 0), (1, None, 4, 0), (1, None, 8, 0)],
    "norm1024": [None, (2, 8, 1, 0), (4, 8, 1, 0), (4, 16, 1, 0)],
}


def _load(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _parse_variants(spec: str) -> dict:
  out = {}
  for part in filter(None, spec.split("|")):
    case, tilings = part.split("=")
    out[case] = [None if t == "default" else tuple(int(v) for v in t.split(","))
                 for t in tilings.split(";")]
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments.gemm_timing import device_times
  from kernels import add_rms_norm as arn
  from kernels import fp8_act_quant as aq
  from kernels import add_rms_norm_mgpu as nm
  from kernels import fp8_act_quant_mgpu as am
  from jaxinfer.ops import E4M3_MAX

  old_act = old_norm = None
  if _OLD_DIR.value:
    old_act = _load(os.path.join(_OLD_DIR.value, "dsmall_old_act.py"), "dsmall_old_act")
    old_norm = _load(os.path.join(_OLD_DIR.value, "dsmall_old_norm.py"), "dsmall_old_norm")
  variants = {**VARIANTS, **_parse_variants(_VARIANTS.value)}
  interp = _INTERPRET.value
  small = _SMALL.value
  I, H = (512, 256) if small else (14336, 4096)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  result = {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": []}

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)

  def partial_splits(n: int, k: int) -> int:
    try:
      from kernels import fp8_decode_matmul_mgpu as fd
      return fd.default_tiling(64, n, k).split_k
    except Exception:   # noqa: BLE001
      return 2

  def inputs(case: str, seed: int):
    """Fresh random inputs of a case (never zeros): a tuple of arrays."""
    rng = np.random.default_rng(seed)
    t = 8 if small else int("".join(c for c in case if c.isdigit()))
    if case.startswith("silu"):
      raw = jnp.asarray(rng.standard_normal((t, 2 * I)) * 40, jnp.bfloat16)
      rs = jnp.asarray(rng.uniform(0.005, 0.05, (t, 1)), jnp.float32)
      cs = jnp.asarray(rng.uniform(0.5, 2.0, 2 * I), jnp.float32)
      return raw, rs, cs
    if case.startswith("rows"):
      return (jnp.asarray(rng.standard_normal((t, H)) * rng.uniform(0.1, 10, (t, 1)),
                          jnp.float16),)
    x = jnp.asarray(rng.standard_normal((t, H)) * 2, jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0.5, 1.5, H), jnp.bfloat16)
    rs = jnp.asarray(rng.uniform(0.001, 0.05, (t, 1)), jnp.float32)
    cs = jnp.asarray(rng.uniform(0.5, 2.0, H), jnp.float32)
    if t <= 64:   # decode: the GEMM's f32 split-K partials (w_down's split)
      s = 2 if small else partial_splits(H, I)
      y = jnp.asarray(rng.standard_normal((s, t, H)) * 40 / np.sqrt(s), jnp.float32)
    else:
      y = jnp.asarray(rng.standard_normal((t, H)) * 40, jnp.bfloat16)
    return x, y, w, rs, cs

  def fn_of(case: str, tiling, old: bool):
    if isinstance(tiling, am.ClusterTiling):
      if case.startswith("norm"):
        return lambda x, y, w, rs, cs: nm.add_rms_norm_fp8(
            x, y, w, eps=1e-5, y_row_scale=rs, y_col_scale=cs, interpret=interp, tiling=tiling)
      if case.startswith("silu"):
        return lambda raw, rs, cs: am.silu_mul_quantize(raw, rs, cs, interpret=interp,
                                                        tiling=tiling)
      return lambda x: am.quantize_rows(x, interpret=interp, tiling=tiling)
    if case.startswith("silu"):
      if old:
        return lambda raw, rs, cs: old_act.silu_mul_quantize(raw, rs, cs, interpret=interp)
      return lambda raw, rs, cs: aq.silu_mul_quantize(raw, rs, cs, interpret=interp,
                                                      tiling=tiling)
    if case.startswith("rows"):
      if old:
        return lambda x: old_act.quantize_rows(x, interpret=interp)
      return lambda x: aq.quantize_rows(x, interpret=interp, tiling=tiling)
    if old:
      return lambda x, y, w, rs, cs: old_norm.add_rms_norm_fp8(
          x, y, w, eps=1e-5, y_row_scale=rs, y_col_scale=cs, interpret=interp)
    return lambda x, y, w, rs, cs: arn.add_rms_norm_fp8(
        x, y, w, eps=1e-5, y_row_scale=rs, y_col_scale=cs, interpret=interp, tiling=tiling)

  def float64_err(case: str, args, out) -> dict:
    """Dequantized codes against float64 NumPy: max |q sx - h| / max |h| and the scales'
    max relative error against amax(h) / 448 (h the float64 value before quantization)."""
    if case.startswith("silu"):
      raw, rs, cs = map(f64, args)
      y = raw * rs * cs
      h = y[:, :I] / (1 + np.exp(-y[:, :I])) * y[:, I:]
      q, sx = out
    elif case.startswith("rows"):
      h = f64(args[0])
      q, sx = out
    else:
      x, y, w, rs, cs = map(f64, args)
      if y.ndim == 3:
        y = y.sum(0)
      s = x + y * rs * cs
      h = w * s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + 1e-5)
      _, q, sx = out
    deq = f64(q) * f64(sx)
    want_sx = np.abs(h).max(axis=1, keepdims=True) / E4M3_MAX
    return {"deq_err": float(np.abs(deq - h).max() / np.abs(h).max()),
            "sx_rel_err": float(np.abs(f64(sx) / want_sx - 1).max()),
            "q_max": float(np.abs(f64(q)).max())}

  t_start = time.perf_counter()
  for case in _CASES.value:
    if time.perf_counter() - t_start > _BUDGET.value:
      print(f"[small] budget: skipping {case}", flush=True)
      continue
    args0 = inputs(case, 1)
    argsets = [inputs(case, 100 + i) for i in range(_ARGSETS.value)]
    base = None
    if old_act is not None:
      base = jax.block_until_ready(jax.jit(fn_of(case, None, True))(*args0))
    def entry(v):
      if v is None:
        return "default", None, False
      if v[0] == 0:
        direct = len(v) > 2 and bool(v[2])
        return (f"mgpu_c{v[1]}{'_direct' if direct else ''}", am.ClusterTiling(v[1], direct),
                False)
      inter = len(v) > 4 and bool(v[4])
      label = "r%d_w%s_s%d%s%s" % (v[0], v[1], v[2], "_reload" if v[3] else "",
                                   "_inter" if inter else "")
      if case.startswith("norm"):
        return label, arn.Tiling(rows=v[0], num_warps=v[1], split=v[2]), False
      return label, aq.Tiling(rows=v[0], num_warps=v[1], split=v[2], reload=bool(v[3]),
                              interleave=inter), False

    entries = (([("old", None, True)] if old_act is not None else [])
               + [entry(v) for v in variants.get(case, [None])])
    for label, tiling, old in entries:
      rec = {"case": case, "variant": label, "tiling": str(tiling)}
      try:
        fn = fn_of(case, tiling, old)
        out = jax.block_until_ready(jax.jit(fn)(*args0))
        rec.update(float64_err(case, args0, out))
        if base is not None:
          rec["differ"] = [float((f64(a) != f64(b)).mean()) for a, b in zip(out, base)]
          if case.startswith(("silu", "rows")) or case.startswith("norm"):
            qa, qb = (out[0], base[0]) if not case.startswith("norm") else (out[1], base[1])
            rec["max_code_diff"] = float(np.abs(f64(qa) - f64(qb)).max())
        if _CHECK_ALL.value and old_act is not None and not old:
          fo, fb = jax.jit(fn), jax.jit(fn_of(case, None, True))
          diffs = []
          for a in argsets:
            o, b = fo(*a), fb(*a)
            diffs.append([float((f64(x) != f64(y)).mean()) for x, y in zip(o, b)])
          rec["differ_all"] = [max(d[i] for d in diffs) for i in range(len(diffs[0]))]
        if not interp and _CALLS.value > 0:
          f = jax.jit(lambda sets: [fn(*a) for a in sets])
          rec.update(device_times(f, argsets, calls=_CALLS.value, prefix="small_trace_"))
      except Exception as e:   # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
      result["results"].append(rec)
      save()
      print(f"[small] {case:9} {label:18} dev_us={rec.get('dev_us', float('nan')):7.2f} "
            f"span_us={rec.get('span_us', float('nan')):7.2f} differ={rec.get('differ')} "
            f"{'differ_all=' + str(rec['differ_all']) + ' ' if 'differ_all' in rec else ''}"
            f"deq_err={rec.get('deq_err', float('nan')):.4f} sx_err={rec.get('sx_rel_err', 0):.2e} "
            f"{rec.get('error', '')[:300]} {rec.get('kernels', '')}", flush=True)
  save()


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  app.run(main)
