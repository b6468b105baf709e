"""Image-quality metrics between two videos of frames in [-1, 1]: PSNR and SSIM (Gaussian window)."""
from __future__ import annotations

import numpy as np


def psnr(a, b, data_range: float = 2.0) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mse = np.mean((a - b) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def _blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
  """Separable Gaussian blur over axes -3, -2 (H, W) of [..., H, W, C], valid region only."""
  t = np.arange(-radius, radius + 1)
  g = np.exp(-t ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  for axis in (x.ndim - 3, x.ndim - 2):
    n = x.shape[axis] - 2 * radius
    x = sum(w * np.take(x, np.arange(k, k + n), axis=axis) for k, w in enumerate(g))
  return x


def ssim(a, b, data_range: float = 2.0) -> float:
  """Mean SSIM (Wang et al. 2004, 11x11 Gaussian σ=1.5) over frames [..., H, W, C]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = _blur(a), _blur(b)
  var_a = _blur(a * a) - mu_a ** 2
  var_b = _blur(b * b) - mu_b ** 2
  cov = _blur(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return float(s.mean())
