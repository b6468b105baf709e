"""Frames in [-1, 1] -> uint8 -> a GIF, MP4 (imageio + imageio-ffmpeg) or, for one frame, a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxinfer.errors import InvalidRequestError


def to_uint8(frames) -> np.ndarray:
  """[T, H, W, 3] floats in [-1, 1] -> uint8 [T, H, W, 3]."""
  f = np.asarray(frames, np.float32)
  if f.ndim != 4 or f.shape[-1] != 3:
    raise InvalidRequestError(f"frames must be [T, H, W, 3], got {f.shape}")
  return np.round((np.clip(f, -1, 1) + 1) * 127.5).astype(np.uint8)


def write_video(frames, path: str | Path, fps: int = 16) -> Path:
  """Writes frames [T, H, W, 3] in [-1, 1]; the suffix picks the format (.gif, .mp4, .png)."""
  import imageio.v3 as iio  # pylint: disable=import-outside-toplevel
  path = Path(path)
  data = to_uint8(frames)
  suffix = path.suffix.lower()
  if suffix == ".gif":
    iio.imwrite(path, data, extension=".gif", duration=1000 / fps, loop=0)
  elif suffix == ".mp4":
    try:
      iio.imwrite(path, data, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
    except (ImportError, RuntimeError) as e:
      raise InvalidRequestError(f"cannot write MP4 (needs imageio-ffmpeg): {e}") from e
  elif suffix in (".png", ".jpg"):
    if len(data) != 1:
      raise InvalidRequestError(f"{suffix} holds one frame, got {len(data)}; use .gif or .mp4")
    iio.imwrite(path, data[0])
  else:
    raise InvalidRequestError(f"unsupported video suffix {suffix!r}; use .gif, .mp4 or .png")
  return path
