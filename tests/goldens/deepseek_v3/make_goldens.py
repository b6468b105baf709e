"""Golden logits of HF transformers' DeepseekV3ForCausalLM on a small random config.

Run under Python 3.11 with the torch 2.13 CPU wheel and transformers (5.23 was used):
    python tests/goldens/deepseek_v3/make_goldens.py
Writes, beside this script, a HF checkpoint folder ``tiny/`` in DeepSeek-V3's own tensor layout
(per-expert ``mlp.experts.{j}.{gate,up,down}_proj.weight``, float32 safetensors, config.json) and
``logits.npz`` (tokens [T] and float32 logits [T, V]). The config exercises group-limited routing
(4 groups, 2 kept), YaRN with mscale != mscale_all_dim, interleaved rope, a dense first layer and a
shared expert. Weights are drawn at scale 1/sqrt(fan_in) so routing and attention are far from uniform.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

HERE = Path(__file__).parent
HF_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "intermediate_size": 96, "moe_intermediate_size": 16,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1, "n_group": 4,
    "topk_group": 2, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
    "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4.0,
                     "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 1.0, "mscale_all_dim": 0.8},
    "rope_interleave": True, "tie_word_embeddings": False, "attention_bias": False,
    "torch_dtype": "float32",
}
SEQ_LEN = 40


def main():
  torch.manual_seed(0)
  cfg = DeepseekV3Config(**{k: v for k, v in HF_CONFIG.items() if k not in ("architectures",)})
  cfg._attn_implementation = "eager"
  model = DeepseekV3ForCausalLM(cfg).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    for layer in model.model.layers[cfg.first_k_dense_replace:]:
      layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(cfg.n_routed_experts))
  tokens = torch.randint(0, cfg.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    logits = model(tokens).logits[0].float().numpy()

  out = HERE / "tiny"
  out.mkdir(exist_ok=True)
  tensors = {}
  I = cfg.moe_intermediate_size
  for name, t in model.state_dict().items():
    t = t.detach().float().contiguous()
    if name.endswith("mlp.experts.gate_up_proj"):
      prefix = name[: -len("gate_up_proj")]
      for j in range(t.shape[0]):
        tensors[f"{prefix}{j}.gate_proj.weight"] = t[j, :I].contiguous()
        tensors[f"{prefix}{j}.up_proj.weight"] = t[j, I:].contiguous()
    elif name.endswith("mlp.experts.down_proj"):
      prefix = name[: -len("down_proj")]
      for j in range(t.shape[0]):
        tensors[f"{prefix}{j}.down_proj.weight"] = t[j].contiguous()
    else:
      tensors[name] = t
  names = sorted(tensors)
  half = len(names) // 2  # two shards, to exercise the shard-by-shard import
  save_file({n: tensors[n] for n in names[:half]}, out / "model-00001-of-00002.safetensors")
  save_file({n: tensors[n] for n in names[half:]}, out / "model-00002-of-00002.safetensors")
  (out / "config.json").write_text(json.dumps(HF_CONFIG, indent=1))
  np.savez(HERE / "logits.npz", tokens=tokens[0].numpy().astype(np.int32), logits=logits)
  print("wrote", out, "logits", logits.shape, "max |logit|", np.abs(logits).max())


if __name__ == "__main__":
  main()
