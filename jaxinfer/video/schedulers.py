"""Flow-matching samplers for Wan: Euler and UniPC (bh2, data prediction, as diffusers' flow UniPC).

Flow matching: x_σ = (1-σ)·x₀ + σ·ε, the denoiser predicts v = ε - x₀, so x₀ = x - σ·v. Sigmas go from
≈1 down to 0, shifted toward the noisy end by σ' = s·σ / (1 + (s-1)·σ) (Wan: s = 3 at 480p, 5 at 720p).
The step coefficients are computed on the host in float64; the updates are a few jnp axpys.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import InvalidRequestError


def flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """(sigmas [num_steps+1] ending in 0, integer timesteps [num_steps]) as diffusers' flow UniPC."""
  if num_steps < 1:
    raise InvalidRequestError(f"num_steps must be >= 1, got {num_steps}")
  if shift <= 0:
    raise InvalidRequestError(f"flow shift must be > 0, got {shift}")
  sigmas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
  sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
  if abs(sigmas[0] - 1) < 1e-6:
    sigmas[0] -= 1e-6                    # keeps log(α) finite in the first UniPC updates
  timesteps = (sigmas * num_train_timesteps).astype(np.int64)
  return np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64), timesteps


@dataclasses.dataclass
class EulerFlow:
  """x_{i+1} = x_i + (σ_{i+1} - σ_i)·v_i."""
  sigmas: np.ndarray

  def step(self, v: jax.Array, x: jax.Array, i: int) -> jax.Array:
    dt = float(self.sigmas[i + 1] - self.sigmas[i])
    return (x.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(x.dtype)


def _lambda(sigma: float) -> float:
  """log-SNR log(α/σ) with α = 1 - σ; +inf at σ = 0."""
  with np.errstate(divide="ignore"):
    return float(np.log(1.0 - sigma) - np.log(sigma))


def _phi_coeffs(h: float, order: int) -> tuple[float, float, np.ndarray]:
  """h_phi_1, B_h (bh2) and the b vector of UniPC for step size h (predicting x0: hh = -h)."""
  hh = -h
  h_phi_1 = np.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1
  b_h = np.expm1(hh)
  b, fact = [], 1
  for i in range(1, order + 1):
    b.append(h_phi_k * fact / b_h)
    fact *= i + 1
    h_phi_k = h_phi_k / hh - 1 / fact
  return float(h_phi_1), float(b_h), np.asarray(b)


@dataclasses.dataclass
class UniPCFlow:
  """Multistep UniPC: predictor UniP-p plus corrector UniC each step (order 2, lower order at the
  start and the final step). Stateful: call ``step`` once per step, in order."""
  sigmas: np.ndarray
  order: int = 2
  lower_order_final: bool = True

  def __post_init__(self):
    self._x0s: list[jax.Array] = []      # data predictions of the last `order` steps
    self._last_sample = None
    self._this_order = 1
    self._lower_order_nums = 0

  def _alpha_sigma(self, i):
    s = float(self.sigmas[i])
    return 1.0 - s, s

  def _predict(self, x, i, order):
    m0 = self._x0s[-1]
    a_t, s_t = self._alpha_sigma(i + 1)
    _, s_s0 = self._alpha_sigma(i)
    lam_s0 = _lambda(self.sigmas[i])
    h = _lambda(self.sigmas[i + 1]) - lam_s0
    rks, d1s = [], []
    for k in range(1, order):
      rk = (_lambda(self.sigmas[i - k]) - lam_s0) / h
      rks.append(rk)
      d1s.append((self._x0s[-(k + 1)] - m0) / rk)
    h_phi_1, b_h, b = _phi_coeffs(h, order)
    out = (s_t / s_s0) * x - a_t * h_phi_1 * m0
    if d1s:
      rhos = [0.5] if order == 2 else np.linalg.solve(
          np.stack([np.asarray(rks + [1.0]) ** j for j in range(order)])[:-1, :-1], b[:-1])
      out = out - a_t * b_h * sum(float(r) * d for r, d in zip(rhos, d1s))
    return out

  def _correct(self, x0_new, last_sample, i, order):
    """Corrects the sample at step i (reached from step i-1) with the fresh x0 prediction."""
    m0 = self._x0s[-1]
    a_t, s_t = self._alpha_sigma(i)
    _, s_s0 = self._alpha_sigma(i - 1)
    lam_s0 = _lambda(self.sigmas[i - 1])
    h = _lambda(self.sigmas[i]) - lam_s0
    rks, d1s = [], []
    for k in range(1, order):
      rk = (_lambda(self.sigmas[i - 1 - k]) - lam_s0) / h
      rks.append(rk)
      d1s.append((self._x0s[-(k + 1)] - m0) / rk)
    rks.append(1.0)
    h_phi_1, b_h, b = _phi_coeffs(h, order)
    rhos = np.array([0.5]) if order == 1 else np.linalg.solve(
        np.stack([np.asarray(rks) ** j for j in range(order)]), b)
    out = (s_t / s_s0) * last_sample - a_t * h_phi_1 * m0
    corr = sum(float(r) * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0.0
    return out - a_t * b_h * (corr + float(rhos[-1]) * (x0_new - m0))

  def step(self, v: jax.Array, x: jax.Array, i: int) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x0 = x32 - float(self.sigmas[i]) * v.astype(jnp.float32)
    if i > 0 and self._last_sample is not None:
      x32 = self._correct(x0, self._last_sample, i, self._this_order)
    self._x0s = (self._x0s + [x0])[-self.order:]
    num_steps = len(self.sigmas) - 1
    order = min(self.order, num_steps - i) if self.lower_order_final else self.order
    self._this_order = min(order, self._lower_order_nums + 1)
    self._last_sample = x32
    out = self._predict(x32, i, self._this_order)
    self._lower_order_nums = min(self._lower_order_nums + 1, self.order)
    return out.astype(x.dtype)


def make_scheduler(name: str, num_steps: int, shift: float):
  sigmas, timesteps = flow_sigmas(num_steps, shift)
  if name == "euler":
    return EulerFlow(sigmas), timesteps
  if name == "unipc":
    return UniPCFlow(sigmas), timesteps
  raise InvalidRequestError(f"unknown scheduler {name!r}; expected 'euler' or 'unipc'")
