"""float64 NumPy reference shared by the paged attention tests: causal attention of each chunk's
queries (token i at position ``start + i``) over its sequence's keys read through its pages."""
import numpy as np


def np_chunk_attention(q, kp, vp, chunks, page_size, scale):
  """q [T, H, D], kp / vp [pages, page_size, KV, D] (float64), chunks: ``attention.SeqChunk``."""
  T, H, _ = q.shape
  KV = kp.shape[2]
  out, t = np.zeros((T, H, vp.shape[-1])), 0
  for c in chunks:
    n_keys = c.start + c.num_tokens
    slots = [c.pages[s // page_size] * page_size + s % page_size for s in range(n_keys)]
    k = kp.reshape(-1, KV, kp.shape[-1])[slots]
    v = vp.reshape(-1, KV, vp.shape[-1])[slots]
    for i in range(c.num_tokens):
      pos = c.start + i
      for h in range(H):
        g = h // (H // KV)
        s = (k[:pos + 1, g] @ q[t + i, h]) * scale
        p = np.exp(s - s.max())
        out[t + i, h] = (p / p.sum()) @ v[:pos + 1, g]
    t += c.num_tokens
  return out
