"""Wan text-to-video from the command line, with real (diffusers folder) or random weights.

  # real weights (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers downloaded to a folder):
  PYTHONPATH=. python3 experiments/t2v.py --checkpoint=/path/Wan2.1-T2V-1.3B-Diffusers \\
      --prompt="a cat surfing" --frames=81 --height=480 --width=832 --steps=50 --out=cat.mp4
  # tiny random model on CPU, plus the quality cost of the step cache and of low-precision GEMMs:
  PYTHONPATH=. python3 experiments/t2v.py --size=tiny --frames=9 --height=64 --width=64 --steps=8 \\
      --out=/tmp/t2v.gif --compare_cache --compare_precision

Quality comparisons decode both runs (same seed) and report PSNR / SSIM of the frames against the
plain bf16 run without cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models import umt5, wan_dit, wan_vae
from jaxinfer.video import pipeline, quality, writer
from jaxinfer.video import low_precision

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "", "diffusers-layout Wan T2V folder; empty: random weights")
flags.DEFINE_enum("size", "tiny", ["tiny", "1.3b", "14b"], "random-weight model size")
flags.DEFINE_string("prompt", "a red fox running through snow", "prompt")
flags.DEFINE_string("negative_prompt", "", "negative prompt (CFG unconditional branch)")
flags.DEFINE_integer("frames", 9, "frames (1 + 4k; 1 = text-to-image)")
flags.DEFINE_integer("height", 64, "pixels (multiple of 16)")
flags.DEFINE_integer("width", 64, "pixels (multiple of 16)")
flags.DEFINE_integer("steps", 8, "denoising steps")
flags.DEFINE_float("guidance", 5.0, "classifier-free guidance scale")
flags.DEFINE_float("shift", 3.0, "flow shift (3 at 480p, 5 at 720p)")
flags.DEFINE_enum("scheduler", "unipc", ["unipc", "euler"], "sampler")
flags.DEFINE_integer("cache_interval", 1, "step cache: full step every k steps (1 = off)")
flags.DEFINE_integer("seed", 0, "noise seed")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "DiT activation dtype")
flags.DEFINE_string("attn", "xla", "attention impl (xla | cudnn)")
flags.DEFINE_integer("sp", 1, "Ulysses sequence-parallel over this many devices (1: off)")
flags.DEFINE_bool("fsdp", False, "with --sp: FSDP-shard the DiT blocks over the same devices")
flags.DEFINE_integer("vae_chunk", 0, "decode this many latent frames at a time (0: all at once)")
flags.DEFINE_string("out", "/tmp/t2v.gif", "output video (.gif, .mp4; .png for one frame)")
flags.DEFINE_bool("compare_cache", False, "also run with cache_interval=2 and report PSNR/SSIM")
flags.DEFINE_bool("compare_f32", False, "also run the DiT with float32 activations (XLA attention): "
                  "how far bf16 itself is from f32, the scale for the low-precision rows")
flags.DEFINE_bool("compare_precision", False, "also run FP8 / NVFP4 GEMM and FP8 attention variants, "
                  "report PSNR/SSIM")
flags.DEFINE_list("precisions", ["fp8attn", "fp8gemm", "fp8", "fp8tok", "nvfp4", "nvfp4a4",
                                  "fp8block"],
                  "variants for --compare_precision (FP8 attention ones need cuDNN: GPU only)")
flags.DEFINE_bool("scan", False, "run the DiT blocks in a lax.scan inside one jitted step (copies each "
                  "layer's weights every step); default: layer by layer, one jitted block reused")
flags.DEFINE_string("json", "", "write the measurements here")

TEXT_LEN = 512


def random_models(size: str):
  if size == "tiny":
    dit_cfg = wan_dit.WanDiTConfig(num_heads=2, head_dim=64, text_dim=64, freq_dim=32, ffn_dim=256,
                                   num_layers=4)
    vae_cfg = wan_vae.WanVAEConfig(base_dim=16, num_res_blocks=1)
  else:
    dit_cfg = {"1.3b": wan_dit.WanDiTConfig.wan21_1_3b(), "14b": wan_dit.WanDiTConfig.wan21_14b()}[size]
    vae_cfg = wan_vae.WanVAEConfig()
  k1, k2 = jax.random.split(jax.random.key(1234))
  init = wan_dit.init_params if size == "tiny" else wan_dit.init_params_on_device
  return dit_cfg, init(dit_cfg, k1, jnp.bfloat16), vae_cfg, wan_vae.init_params(vae_cfg, k2)


def random_text(prompt: str, dim: int) -> jax.Array:
  """Stand-in prompt embedding for random weights: deterministic in the prompt, zero-padded to 512."""
  seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
  n = min(TEXT_LEN, max(1, len(prompt.split())))
  emb = np.zeros((1, TEXT_LEN, dim), np.float32)
  emb[0, :n] = np.random.default_rng(seed).standard_normal((n, dim))
  return jnp.asarray(emb)


def real_text(folder: Path, prompts: list[str]):
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  from checkpoints import diffusers_wan  # pylint: disable=import-outside-toplevel
  tok = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))
  cfg, params = diffusers_wan.load_text_encoder(folder)
  out = []
  for p in prompts:
    ids = tok.encode(p).ids[:TEXT_LEN]
    mask = np.zeros((1, TEXT_LEN), np.int32)
    mask[0, :len(ids)] = 1
    arr = np.zeros((1, TEXT_LEN), np.int32)
    arr[0, :len(ids)] = ids
    out.append(umt5.encode_prompts(params, jnp.asarray(arr), jnp.asarray(mask), cfg))
  return out


PRECISIONS = {  # name: (linear kind, calibrated FP8 attention); "bf16": a repeat (determinism)
    "bf16": ("bf16", False), "fp8attn": ("bf16", True), "fp8gemm": ("fp8", False), "fp8": ("fp8", True),
    "fp8tok": ("fp8tok", True), "nvfp4": ("nvfp4", False), "nvfp4a4": ("nvfp4a4", False),
    "fp8block": ("fp8block", False), "fp8blockattn": ("fp8block", True),
    "fp8xla": ("fp8xla", False)}
CALIBRATED_LINEARS = ("fp8", "nvfp4a4")   # linear kinds with static activation scales


def calibration_stats(params, dit_cfg, vae_cfg, t2v, text, neg, dtype):
  """Per-block FP8 statistics from bf16 forwards on fresh noise (not the run's seed) at three of the
  run's timesteps, with the CFG batch (prompt, negative prompt)."""
  from jaxinfer.video import schedulers  # pylint: disable=import-outside-toplevel
  _, timesteps = schedulers.make_scheduler(t2v.scheduler, t2v.num_steps, t2v.shift)
  shape = pipeline.latent_shape(t2v, dit_cfg, vae_cfg)
  ctx = jnp.concatenate([text, neg])
  lat = jax.random.normal(jax.random.key(t2v.seed + 1), (ctx.shape[0], *shape), dtype)
  picks = [float(timesteps[i]) for i in sorted({0, len(timesteps) // 2, len(timesteps) - 1})]
  attn = "cudnn" if jax.default_backend() == "gpu" else None
  return low_precision.calibrate_model(params, dit_cfg, lat, picks, ctx.astype(dtype), attn)


def main(_):
  if FLAGS.checkpoint:
    from checkpoints import diffusers_wan  # pylint: disable=import-outside-toplevel
    folder = Path(FLAGS.checkpoint)
    dit_cfg, dit_p = diffusers_wan.load_dit(folder)
    vae_cfg, vae_p = diffusers_wan.load_vae(folder)
    text, neg = real_text(folder, [FLAGS.prompt, FLAGS.negative_prompt])
  else:
    dit_cfg, dit_p, vae_cfg, vae_p = random_models(FLAGS.size)
    text, neg = random_text(FLAGS.prompt, dit_cfg.text_dim), random_text(FLAGS.negative_prompt,
                                                                          dit_cfg.text_dim)
  t2v = pipeline.T2VConfig(num_frames=FLAGS.frames, height=FLAGS.height, width=FLAGS.width,
                           num_steps=FLAGS.steps, guidance_scale=FLAGS.guidance, shift=FLAGS.shift,
                           scheduler=FLAGS.scheduler, cache_interval=FLAGS.cache_interval,
                           seed=FLAGS.seed)
  dtype = jnp.dtype(FLAGS.dtype)
  mesh = None
  if FLAGS.sp > 1:
    from sharding import ulysses  # pylint: disable=import-outside-toplevel
    mesh = jax.make_mesh((FLAGS.sp,), ("sp",), devices=jax.devices()[:FLAGS.sp])
    dit_p = ulysses.shard_params(dit_p, mesh, "sp", FLAGS.fsdp)

  stack = (lambda p: wan_dit.stack_blocks(p)) if FLAGS.scan and mesh is None else (lambda p: p)

  def run(t2v_, params, dtype=dtype, attn=FLAGS.attn):
    t0 = time.perf_counter()
    frames = pipeline.generate(stack(params), dit_cfg, vae_p, vae_cfg, text, neg, t2v_,
                               attn_impl=attn, dtype=dtype, vae_chunk=FLAGS.vae_chunk or None,
                               mesh=mesh, fsdp=FLAGS.fsdp)
    return frames, time.perf_counter() - t0

  frames, secs = run(t2v, dit_p)
  path = writer.write_video(frames, FLAGS.out, fps=16)
  print(f"wrote {path}: {frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]} in {secs:.1f}s "
        "(incl. compile)", flush=True)
  results = {"frames": list(frames.shape), "seconds": secs, "steps": FLAGS.steps,
             "size": FLAGS.checkpoint or FLAGS.size, "device": jax.devices()[0].device_kind,
             "height": FLAGS.height, "width": FLAGS.width, "num_frames": FLAGS.frames,
             "guidance": FLAGS.guidance, "scheduler": FLAGS.scheduler, "comparisons": {}}

  def flush():     # after every run, so a run cut short by a time limit keeps what it measured
    if FLAGS.json:
      Path(FLAGS.json).write_text(json.dumps(results, indent=1))
  flush()
  variants = []
  if FLAGS.compare_cache:
    variants.append(("cache_interval=2", dataclasses.replace(t2v, cache_interval=2, cache_warmup=2),
                     lambda: dit_p))
  if FLAGS.compare_f32:
    variants.append(("dit_float32", t2v, lambda: dit_p, dict(dtype=jnp.float32, attn="xla")))
  if FLAGS.compare_precision:
    stats = []

    def make(lin, fp8_attn):
      if (lin in CALIBRATED_LINEARS or fp8_attn) and not stats:
        t0 = time.perf_counter()
        stats.extend(calibration_stats(dit_p, dit_cfg, vae_cfg, t2v, text, neg, dtype))
        results["calibration_s"] = time.perf_counter() - t0
      return low_precision.quantize_model(
          dit_p, lin, stats if (lin in CALIBRATED_LINEARS or fp8_attn) else None, fp8_attn)
    for name in FLAGS.precisions:
      lin, fp8_attn = PRECISIONS[name]
      if fp8_attn and jax.default_backend() != "gpu":
        print(f"{name}: skipped (cuDNN FP8 attention needs a GPU)")
        continue
      variants.append((name, t2v, lambda lin=lin, a=fp8_attn: make(lin, a)))
  for name, t2v_, params_fn, *opt in variants:
    run_kw = opt[0] if opt else {}
    try:
      t0 = time.perf_counter()
      params = params_fn()
      prep_s = time.perf_counter() - t0
      other, s = run(t2v_, params, **run_kw)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      results["comparisons"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      flush()
      continue
    row = {"psnr_db": quality.psnr(other, frames), "ssim": quality.ssim(other, frames), "seconds": s,
           "prepare_s": prep_s}
    results["comparisons"][name] = row
    print(f"{name:18s} PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.4f}  ({s:.1f}s incl. compile)",
          flush=True)
    flush()


if __name__ == "__main__":
  app.run(main)
