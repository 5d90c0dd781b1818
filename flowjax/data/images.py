"""Image preprocessing shared by the image sources (tfds, folder, arrays): ADM's resize and
center crop, and the map of 8-bit pixels to [-1, 1].

Importing this module imports Pillow and NumPy only (no TensorFlow).
"""

import numpy as np
from PIL import Image


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
  """ADM's center_crop_arr: BOX-halve while the short side >= 2 * size, BICUBIC-resize the
  short side to size, then crop the center.

  uint8 images are resized in Pillow's 8-bit modes, exactly as ADM (guided-diffusion) does;
  float images channel by channel in Pillow's 32-bit float mode, with the same steps (there the
  bicubic step may overshoot the input range: the caller clips).

  Args:
    image: [H, W, C] uint8 or float32.
    image_size: S, the output side.

  Returns:
    [S, S, C], of the input's dtype (float32 for floats).
  """
  channels = image.shape[-1]
  if image.dtype == np.uint8 and channels <= 4:
    pil_image = Image.fromarray(image[..., 0] if channels == 1 else image)
    array = _crop_center(np.asarray(_resize_short_side(pil_image, image_size)), image_size)
    return array[..., None] if channels == 1 else array
  # Pillow filters every channel on its own, so channel by channel is the same resize.
  planes = image if image.dtype == np.uint8 else image.astype(np.float32)
  return np.stack([
      _crop_center(np.asarray(_resize_short_side(
          Image.fromarray(np.ascontiguousarray(planes[..., c])), image_size)), image_size)
      for c in range(channels)
  ], axis=-1)


def _resize_short_side(pil_image: Image.Image, image_size: int) -> Image.Image:
  """BOX-halves while the short side >= 2 * image_size, then BICUBIC to short side image_size."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size),
                                 resample=Image.Resampling.BOX)
  scale = image_size / min(*pil_image.size)
  return pil_image.resize(tuple(round(side * scale) for side in pil_image.size),
                          resample=Image.Resampling.BICUBIC)


def _crop_center(array: np.ndarray, image_size: int) -> np.ndarray:
  """[H, W, ...] with H, W >= S -> the central [S, S, ...]."""
  crop_y = (array.shape[0] - image_size) // 2
  crop_x = (array.shape[1] - image_size) // 2
  return array[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def uint8_to_unit_range(image: np.ndarray) -> np.ndarray:
  """Pixels [...] uint8 in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1)."""
  return image.astype(np.float32) / 127.5 - 1.0
