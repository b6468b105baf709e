"""The `jaxinfer` command line, run as a user runs it (a subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _run(args, tmp_path, timeout=600):
  env = {**os.environ, "JAXINFER_COMPILATION_CACHE": str(tmp_path / "xla"), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxinfer.cli", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=timeout)


def test_generate_with_default_model_fills_compilation_cache(tmp_path):
  r = _run(["generate", "--prompt", "What is the capital of France?", "--chat", "--max_tokens", "8"],
           tmp_path)
  assert r.returncode == 0, r.stderr
  assert "The capital of France is Paris" in r.stdout
  assert "tokens/s" in r.stderr
  assert any((tmp_path / "xla").iterdir()), "persistent compilation cache left empty"


def test_bad_invocations_exit_with_clear_errors(tmp_path):
  r = _run(["generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "hi"], tmp_path)
  assert r.returncode == 2 and "no such checkpoint" in r.stderr
  r = _run(["generate", "--prompt", "hi", "--top_p", "0"], tmp_path)
  assert r.returncode == 2 and "top_p" in r.stderr
  r = _run(["generate"], tmp_path)
  assert r.returncode == 1 and "--prompt is required" in r.stderr
  r = _run(["frobnicate"], tmp_path)
  assert r.returncode == 1 and "usage: jaxinfer" in r.stderr
