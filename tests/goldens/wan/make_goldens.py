"""Writes the Wan goldens: diffusers WanTransformer3DModel, AutoencoderKLWan (decoder), transformers
UMT5EncoderModel and diffusers' flow UniPC scheduler, all on tiny random configs, in float32.

Run (Python 3.11, CPU torch wheel):
  /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /tmp/venv311 && /tmp/venv311/bin/pip install torch==2.13.0 diffusers transformers
  /tmp/venv311/bin/python tests/goldens/wan/make_goldens.py
Generated with torch 2.13.0+cpu, diffusers 0.42.1, transformers 5.23.0.
Each .npz holds the module's state dict under "param/<torch name>", the inputs and the outputs.
"""
import os

import numpy as np
import torch

OUT = os.path.dirname(os.path.abspath(__file__))
torch.manual_seed(0)


def _randomize(module, scale=0.5):
  """Every parameter random (norm gains and biases too), so a wrong mapping cannot hide."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 or "gamma" in name or "scale_shift" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if ("norm" in name or "gamma" in name)
                and "bias" not in name else scale * torch.randn(p.shape, generator=g))


def _params(module):
  return {f"param/{k}": v.detach().numpy().astype(np.float32) for k, v in module.state_dict().items()}


def dit():
  from diffusers import WanTransformer3DModel
  cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
             out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
  model = WanTransformer3DModel(**cfg).eval()
  _randomize(model, 0.3)
  g = torch.Generator().manual_seed(2)
  x = torch.randn(2, 4, 3, 4, 6, generator=g)
  t = torch.tensor([999.0, 321.5])
  text = torch.randn(2, 5, 16, generator=g)
  with torch.no_grad():
    out = model(x, t, text, return_dict=False)[0]
  cfg_np = {f"config/{k}": np.asarray(v) for k, v in cfg.items() if k != "qk_norm"}
  np.savez_compressed(os.path.join(OUT, "dit.npz"), **_params(model), **cfg_np,
                      hidden_states=x.numpy(), timestep=t.numpy(), encoder_hidden_states=text.numpy(),
                      output=out.numpy())
  print("dit", out.shape, float(out.abs().mean()))


def vae():
  from diffusers import AutoencoderKLWan
  cfg = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
             latents_std=[1.5, 0.8, 1.2, 2.0])
  model = AutoencoderKLWan(**cfg).eval()
  _randomize(model, 0.1)
  g = torch.Generator().manual_seed(3)
  z = torch.randn(1, 4, 3, 4, 6, generator=g)
  with torch.no_grad():
    out = model.decode(z, return_dict=False)[0]
    raw = model.decoder(model.post_quant_conv(z[:, :, :1]), feat_cache=None)  # one frame, no clamp
  state = {k: v for k, v in _params(model).items() if k.startswith("param/decoder.") or
           k.startswith("param/post_quant_conv.")}
  np.savez_compressed(os.path.join(OUT, "vae.npz"), **state, z=z.numpy(), output=out.numpy(),
                      first_frame_unclamped=raw.numpy())
  print("vae", out.shape, float(out.abs().mean()), float((out.abs() == 1).float().mean()))


def umt5():
  from transformers import UMT5Config, UMT5EncoderModel
  cfg = UMT5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
  model = UMT5EncoderModel(cfg).eval()
  _randomize(model, 0.3)
  g = torch.Generator().manual_seed(4)
  ids = torch.randint(1, 64, (2, 9), generator=g)
  mask = torch.ones(2, 9, dtype=torch.long)
  mask[1, 6:] = 0
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
  np.savez_compressed(os.path.join(OUT, "umt5.npz"), **_params(model), input_ids=ids.numpy(),
                      attention_mask=mask.numpy(), output=out.numpy())
  print("umt5", out.shape, float(out.abs().mean()))


def unipc():
  from diffusers import UniPCMultistepScheduler
  sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                  num_train_timesteps=1000, flow_shift=3.0)
  sched.set_timesteps(10)
  g = torch.Generator().manual_seed(5)
  x = torch.randn(2, 3, 4, generator=g)
  c = torch.randn(2, 3, 4, generator=g)
  xs, outs = [x.numpy().copy()], []
  for t in sched.timesteps:
    v = 0.7 * x - c * torch.cos(t / 300.0)           # a deterministic stand-in for the denoiser
    outs.append(v.numpy().copy())
    x = sched.step(v, t, x, return_dict=False)[0]
    xs.append(x.numpy().copy())
  np.savez_compressed(os.path.join(OUT, "unipc.npz"), timesteps=sched.timesteps.numpy(),
                      sigmas=sched.sigmas.numpy(), samples=np.stack(xs), c=c.numpy(),
                      model_outputs=np.stack(outs))
  print("unipc", sched.timesteps[:3], sched.sigmas[:3])


if __name__ == "__main__":
  dit()
  vae()
  umt5()
  unipc()
