"""``jaxinfer`` command line.

    jaxinfer generate --prompt "Once upon a time" [--chat] [--model PATH] [--max_tokens 64] ...
    jaxinfer convert --model PATH --output DIR      # import once, save in jaxinfer's orbax format

With no --model, the embedded default SmolLM2-135M-Instruct is used.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "GGUF file, HF folder or jaxinfer orbax folder (default: embedded "
                    "SmolLM2-135M-Instruct)")
flags.DEFINE_multi_string("prompt", None, "prompt text (repeat for a batch)")
flags.DEFINE_bool("chat", False, "wrap each prompt as a user message in the model's chat template")
flags.DEFINE_integer("max_tokens", 64, "tokens to generate per prompt")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_integer("top_k", 0, "0 = off")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass, in (0, 1]")
flags.DEFINE_integer("seed", None, "sampling seed")
flags.DEFINE_multi_string("stop", [], "stop string (repeatable)")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "parameter and activation dtype (default: "
                  "float32 on CPU, bfloat16 on GPU)")
flags.DEFINE_string("output", None, "convert: output folder")

COMMANDS = ("generate", "convert")


def _generate() -> None:
  import jax.numpy as jnp

  from jaxinfer.llm import LLM
  from jaxinfer.sampling import SamplingParams

  if not FLAGS.prompt:
    raise app.UsageError("--prompt is required")
  params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                          top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed,
                          stop=tuple(FLAGS.stop))
  llm = LLM(FLAGS.model, dtype=FLAGS.dtype and getattr(jnp, FLAGS.dtype))
  prompts = [[{"role": "user", "content": p}] for p in FLAGS.prompt] if FLAGS.chat else FLAGS.prompt
  start = time.perf_counter()
  outputs = llm.generate(prompts, params, use_tqdm=False)
  elapsed = time.perf_counter() - start
  for prompt, out in zip(FLAGS.prompt, outputs):
    print(f"--- {prompt!r}\n{out.text}\n")
  n = sum(len(o.token_ids) for o in outputs)
  print(f"[{n} tokens in {elapsed:.2f}s = {n / elapsed:.1f} tokens/s, including any "
        "compilation]", file=sys.stderr)


def _convert() -> None:
  from jaxinfer.loader import load_model
  import jax.numpy as jnp

  if not FLAGS.output:
    raise app.UsageError("--output is required")
  load_model(FLAGS.model, dtype=FLAGS.dtype and getattr(jnp, FLAGS.dtype)).save(FLAGS.output)
  print(f"saved {FLAGS.output}")


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: jaxinfer {{{'|'.join(COMMANDS)}}} [flags]")
  if len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[2:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the generated text, not backend chatter
  from jaxinfer.errors import JaxinferError
  try:
    {"generate": _generate, "convert": _convert}[argv[1]]()
  except JaxinferError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
