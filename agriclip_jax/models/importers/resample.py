"""Resampling a ViT's position-embedding grid to another size at import, with each reference
library's own kernel, so a tower imported at a new resolution equals the reference model run at
that resolution: PyTorch's bicubic (HF ViT, DINOv2), its anti-aliased bicubic (timm, open_clip,
DINOv2 with registers) and bilinear (big_vision)."""

import numpy as np


def _cubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] weights of PyTorch's bicubic interpolation (align_corners=False, edges
  clamped), so a resampled grid equals the reference libraries' own resampling."""
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = (i + 0.5) * scale - 0.5
    base = int(np.floor(center))
    t = center - base
    for offset, dist in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
      d = abs(dist)
      w = ((a + 2) * d ** 3 - (a + 3) * d ** 2 + 1 if d <= 1
           else a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.0)
      weights[i, min(max(base + offset, 0), in_size - 1)] += w
  return weights


def resample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """[1, gh, gw, d] position grid -> [1, height, width, d], bicubic (PyTorch's kernel)."""
  _, gh, gw, _ = grid.shape
  rows, cols = _cubic_weights(gh, height), _cubic_weights(gw, width)
  out = np.einsum("hi,wj,bijd->bhwd", rows, cols, grid.astype(np.float64))
  return out.astype(grid.dtype)


def _linear_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of PyTorch's bilinear interpolation (align_corners=False, no
  antialiasing: source positions below 0 clamped to 0, the last index repeated at the edge)."""
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = max((i + 0.5) * scale - 0.5, 0.0)
    base = min(int(center), in_size - 1)
    t = center - base
    weights[i, base] += 1 - t
    weights[i, min(base + 1, in_size - 1)] += t
  return weights


def bilinear_resample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """[1, gh, gw, d] position grid -> [1, height, width, d], bilinear: how timm resizes an
  AugReg / big_vision .npz grid when it loads one (`_load_weights`)."""
  _, gh, gw, _ = grid.shape
  rows, cols = _linear_weights(gh, height), _linear_weights(gw, width)
  out = np.einsum("hi,wj,bijd->bhwd", rows, cols, grid.astype(np.float64))
  return out.astype(grid.dtype)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
  far = a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def antialiased_cubic_weights(in_size: int, out_size: int, a: float = -0.5) -> np.ndarray:
  """[out, in] weights of PyTorch's `interpolate(mode="bicubic", antialias=True)`: output i
  centres at (i + 0.5) * in / out; the kernel spans 2 * max(in / out, 1) inputs either side,
  only the taps inside the grid count, renormalised to sum to one."""
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = (i + 0.5) * scale
    # PyTorch truncates toward zero, as int() does, before clipping to the grid.
    first = max(int(center - 2 * stretch + 0.5), 0)
    stop = min(int(center + 2 * stretch + 0.5), in_size)
    taps = _keys_cubic((np.arange(first, stop) + 0.5 - center) / stretch, a)
    weights[i, first:stop] = taps / taps.sum()
  return weights


def antialiased_resample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """[1, gh, gw, d] position grid -> [1, height, width, d] as DINOv2 with registers resizes."""
  _, gh, gw, _ = grid.shape
  rows = antialiased_cubic_weights(gh, height)
  cols = antialiased_cubic_weights(gw, width)
  out = np.einsum("hi,wj,bijd->bhwd", rows, cols, grid.astype(np.float64))
  return out.astype(grid.dtype)
