"""A procedural street-scene dataset with the 19 Cityscapes classes.

Each scene: a horizon and a vanishing point; sky with a gradient; a row of
buildings with window grids, walls and fences; trees and terrain; a road in
perspective with lane markings between sidewalks; poles carrying traffic signs
and lights; cars, trucks, buses, a tram, people, riders on bicycles and
motorcycles, scaled by their distance and drawn far-to-near so near objects
occlude far ones. Textures (block and pixel noise), a global light level,
colour cast and a soft shadow vary per image, and class colours vary per
object, so a model has to use shape and context, not a colour lookup. Some
images carry an ego-vehicle strip labelled "ego vehicle" (ignored in training).

Scenes are deterministic by (seed, split, index). ``write_dataset`` writes
them in the Cityscapes layout (``leftImg8bit/<split>/<city>/*_leftImg8bit.png``
and ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` with Cityscapes label ids),
so reading them exercises the Cityscapes source.
"""

import json
import os
import shutil
import tempfile
from typing import Tuple

import numpy as np
from PIL import Image

CITY = "synthetic"
_MARKER = "transkd_generated.json"

# Cityscapes label ids of the classes drawn here.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 7, 8, 11, 12, 13, 17, 19, 20
VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS = 21, 22, 23, 24, 25, 26, 27, 28
TRAIN, MOTORCYCLE, BICYCLE, EGO = 31, 32, 33, 1

# Base colours (RGB, 0..1) with a per-object jitter, loosely like real scenes.
_BASE = {
  ROAD: (0.33, 0.32, 0.34),
  SIDEWALK: (0.62, 0.56, 0.55),
  BUILDING: (0.45, 0.42, 0.40),
  WALL: (0.55, 0.50, 0.42),
  FENCE: (0.50, 0.45, 0.38),
  POLE: (0.40, 0.40, 0.42),
  LIGHT: (0.12, 0.12, 0.12),
  SIGN: (0.85, 0.75, 0.15),
  VEGETATION: (0.22, 0.42, 0.15),
  TERRAIN: (0.45, 0.55, 0.25),
  SKY: (0.55, 0.70, 0.90),
  PERSON: (0.50, 0.25, 0.25),
  RIDER: (0.60, 0.20, 0.20),
  CAR: (0.20, 0.25, 0.55),
  TRUCK: (0.55, 0.55, 0.60),
  BUS: (0.75, 0.60, 0.15),
  TRAIN: (0.70, 0.72, 0.75),
  MOTORCYCLE: (0.15, 0.15, 0.20),
  BICYCLE: (0.35, 0.10, 0.12),
  EGO: (0.05, 0.05, 0.06),
}


class _Canvas:
  """An image (H x W x 3, float) and its label map, with clipped drawing helpers."""

  def __init__(self, height, width, rng):
    self.h, self.w, self.rng = height, width, rng
    self.img = np.zeros((height, width, 3), np.float32)
    self.lab = np.zeros((height, width), np.uint8)
    # Block noise (texture at 1/8 scale) and fine noise, shared by every surface.
    bh, bw = -(-height // 8), -(-width // 8)
    self.block = np.repeat(np.repeat(rng.standard_normal((bh, bw)).astype(np.float32), 8, 0), 8, 1)[
      :height, :width
    ]
    self.fine = rng.standard_normal((height, width)).astype(np.float32)

  def colour(self, cls, jitter=0.08):
    return np.clip(
      np.asarray(_BASE[cls], np.float32) + self.rng.normal(0, jitter, 3).astype(np.float32), 0, 1
    )

  def fill(self, mask, cls, colour=None, texture=0.05, ys=None, xs=None):
    """Paints ``mask`` (bool array, or over the window ys x xs) with a textured colour."""
    colour = self.colour(cls) if colour is None else colour
    ys = slice(None) if ys is None else ys
    xs = slice(None) if xs is None else xs
    tex = texture * (self.block[ys, xs] + 0.5 * self.fine[ys, xs])
    patch = self.img[ys, xs]
    patch[mask] = colour[None, :] + tex[mask][:, None]
    self.lab[ys, xs][mask] = cls

  def rect(self, y0, y1, x0, x1, cls, colour=None, texture=0.05):
    y0, y1 = max(int(y0), 0), min(int(y1), self.h)
    x0, x1 = max(int(x0), 0), min(int(x1), self.w)
    if y0 >= y1 or x0 >= x1:
      return None
    ys, xs = slice(y0, y1), slice(x0, x1)
    self.fill(np.ones((y1 - y0, x1 - x0), bool), cls, colour, texture, ys, xs)
    return ys, xs

  def ellipse(self, cy, cx, ry, rx, cls, colour=None, texture=0.05):
    y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, self.h)
    x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, self.w)
    if y0 >= y1 or x0 >= x1 or ry <= 0 or rx <= 0:
      return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    self.fill(mask, cls, colour, texture, slice(y0, y1), slice(x0, x1))


def _sky_and_background(c: _Canvas, horizon: int, vx: float):
  rng, h, w = c.rng, c.h, c.w
  # Sky: vertical gradient, brighter near the horizon.
  top = c.colour(SKY, 0.1)
  t = np.linspace(0, 1, max(horizon, 1), dtype=np.float32)[:, None, None]
  c.img[:horizon] = top * (0.8 + 0.3 * t) + 0.02 * c.fine[:horizon, :, None]
  c.lab[:horizon] = SKY
  # Buildings: a row of blocks standing on the horizon, with window grids.
  x = -rng.integers(0, w // 8 + 1)
  while x < w:
    bw = int(rng.integers(w // 10, w // 4))
    top_y = int(horizon - rng.uniform(0.25, 0.95) * horizon)
    if rng.uniform() < 0.85:
      window = c.rect(top_y, horizon + 4, x, x + bw, BUILDING)
      if window is not None:
        ys, xs = window
        wy, wx = np.ogrid[ys, xs]
        py, px = int(rng.integers(6, 12)), int(rng.integers(6, 14))
        grid = ((wy - top_y) % py > py // 2) & ((wx - x) % px > px // 2) & (wy < horizon - 4)
        shade = 0.15 if rng.uniform() < 0.5 else 0.75
        c.img[ys, xs][grid] = shade + 0.05 * c.fine[ys, xs][grid][:, None]
    else:  # a gap filled by trees
      c.ellipse(
        horizon - 0.25 * horizon, x + bw / 2, 0.3 * horizon, bw / 2, VEGETATION, texture=0.12
      )
    x += bw
  # Low walls or fences in front of some buildings.
  for _ in range(rng.integers(0, 3)):
    x0 = rng.uniform(0, w)
    cls = WALL if rng.uniform() < 0.5 else FENCE
    span = rng.uniform(0.1, 0.3) * w
    height = rng.uniform(0.04, 0.1) * h
    window = c.rect(horizon - height, horizon + 2, x0, x0 + span, cls)
    if window is not None and cls == FENCE:  # vertical slats show the sky-ish background
      ys, xs = window
      _, fx = np.ogrid[ys, xs]
      gaps = np.broadcast_to((fx % 6) < 2, (ys.stop - ys.start, xs.stop - xs.start))
      c.img[ys, xs][gaps] *= 0.6
  del vx


def _ground(c: _Canvas, horizon: int, vx: float):
  rng, h, w = c.rng, c.h, c.w
  yy, xx = np.mgrid[horizon:h, 0:w].astype(np.float32)
  depth = (yy - horizon + 1) / (h - horizon)  # 0 at the horizon, 1 at the bottom
  half_road = (0.05 + rng.uniform(0.5, 0.75) * depth) * w
  walk = half_road + (0.02 + rng.uniform(0.12, 0.3) * depth) * w
  dx = np.abs(xx - vx)
  region = c.lab[horizon:]
  ys = slice(horizon, h)
  terrain = dx >= walk
  c.fill(terrain, TERRAIN if rng.uniform() < 0.6 else VEGETATION, texture=0.1, ys=ys)
  side = (dx >= half_road) & (dx < walk)
  c.fill(side, SIDEWALK, texture=0.04, ys=ys)
  road = dx < half_road
  c.fill(road, ROAD, texture=0.03, ys=ys)
  # Lane markings (still road): dashes along the centre line, in perspective.
  lane = road & (dx < 0.006 * w * (1 + 3 * depth)) & (np.sin(40 * np.sqrt(depth) * np.pi) > 0)
  c.img[ys][lane] = 0.85
  del region
  return half_road, walk


def _poles(c: _Canvas, horizon: int, vx: float, walk_fn):
  rng, h, w = c.rng, c.h, c.w
  for _ in range(rng.integers(1, 5)):
    base = rng.uniform(horizon + 0.1 * (h - horizon), h)
    depth = (base - horizon) / (h - horizon)
    inner, outer = walk_fn(depth)
    side = 1 if rng.uniform() < 0.5 else -1
    x = vx + side * rng.uniform(inner, outer)
    height = (0.15 + 0.55 * depth) * h
    width = max(1.0, 0.008 * w * (0.3 + depth))
    c.rect(base - height, base, x - width / 2, x + width / 2, POLE, texture=0.02)
    kind = rng.uniform()
    size = max(2.0, 0.035 * w * (0.3 + depth))
    top = base - height
    if kind < 0.45:
      c.rect(top, top + size, x - size / 2, x + size / 2, SIGN, texture=0.02)
    elif kind < 0.8:
      c.rect(top, top + 2.2 * size, x - 0.45 * size, x + 0.45 * size, LIGHT, texture=0.02)
      lamp = np.array(
        [(0.9, 0.1, 0.1), (0.9, 0.7, 0.1), (0.1, 0.8, 0.2)][rng.integers(3)], np.float32
      )
      c.ellipse(top + 0.5 * size, x, 0.3 * size, 0.3 * size, LIGHT, colour=lamp, texture=0.0)


def _vehicle(c: _Canvas, base, x, scale, cls):
  rng = c.rng
  length = {CAR: 1.0, TRUCK: 1.5, BUS: 2.2, TRAIN: 3.0}[cls] * scale
  height = {CAR: 0.45, TRUCK: 0.8, BUS: 0.85, TRAIN: 0.8}[cls] * scale
  body = c.rect(base - height, base - 0.08 * scale, x - length / 2, x + length / 2, cls)
  if body is None:
    return
  # Windows (darker band) and wheels: part of the vehicle's class, as in Cityscapes.
  glass = np.array([0.15, 0.18, 0.22], np.float32) + rng.normal(0, 0.03, 3).astype(np.float32)
  top = base - height
  c.rect(
    top + 0.1 * height,
    top + 0.45 * height,
    x - 0.4 * length,
    x + 0.4 * length,
    cls,
    colour=glass,
    texture=0.02,
  )
  for wx in (x - 0.3 * length, x + 0.3 * length):
    c.ellipse(
      base - 0.1 * scale,
      wx,
      0.12 * scale,
      0.12 * scale,
      cls,
      colour=np.array([0.05, 0.05, 0.05], np.float32),
      texture=0.01,
    )


def _person(c: _Canvas, base, x, scale, cls=PERSON):
  height = 0.9 * scale
  width = 0.22 * scale
  c.rect(base - 0.85 * height, base - 0.45 * height, x - width / 2, x + width / 2, cls)
  c.rect(
    base - 0.45 * height, base, x - 0.4 * width, x + 0.4 * width, cls, colour=c.colour(cls) * 0.6
  )
  c.ellipse(
    base - 0.92 * height,
    x,
    0.08 * height,
    0.08 * height,
    cls,
    colour=np.array([0.85, 0.65, 0.5], np.float32),
    texture=0.02,
  )


def _rider(c: _Canvas, base, x, scale):
  cls = BICYCLE if c.rng.uniform() < 0.5 else MOTORCYCLE
  length = 0.6 * scale
  for wx in (x - length / 2, x + length / 2):
    c.ellipse(base - 0.15 * scale, wx, 0.15 * scale, 0.15 * scale, cls, texture=0.02)
  c.rect(base - 0.3 * scale, base - 0.2 * scale, x - length / 2, x + length / 2, cls)
  _person(c, base - 0.25 * scale, x, 0.75 * scale, RIDER)


def _objects(c: _Canvas, horizon: int, vx: float, road_fn, walk_fn):
  rng, h, w = c.rng, c.h, c.w
  items = []
  for _ in range(rng.integers(3, 12)):
    kind = rng.choice(["car"] * 6 + ["truck", "bus", "train"] + ["person"] * 4 + ["rider"] * 2)
    base = rng.uniform(horizon + 0.08 * (h - horizon), h)
    items.append((base, kind))
  for base, kind in sorted(items):  # far (small y) first: near objects occlude them
    depth = (min(base, h) - horizon) / (h - horizon)
    scale = (0.02 + 0.2 * depth) * w
    road, walk = road_fn(depth), walk_fn(depth)
    if kind in ("person", "rider") and rng.uniform() < 0.7:
      side = 1 if rng.uniform() < 0.5 else -1
      x = vx + side * rng.uniform(road, walk[1])
    else:
      x = vx + rng.uniform(-0.9, 0.9) * road
    if kind == "person":
      _person(c, base, x, scale)
    elif kind == "rider":
      _rider(c, base, x, scale)
    else:
      _vehicle(c, base, x, scale, {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}[kind])


def generate_scene(seed: int, index: int, size: Tuple[int, int] = (256, 512)):
  """(image uint8 H x W x 3, label uint8 H x W of Cityscapes label ids) for one scene."""
  h, w = size
  rng = np.random.default_rng([seed, index])
  c = _Canvas(h, w, rng)
  horizon = int(rng.uniform(0.35, 0.55) * h)
  vx = rng.uniform(0.3, 0.7) * w
  road_k, walk_k = rng.uniform(0.5, 0.75), rng.uniform(0.12, 0.3)
  _sky_and_background(c, horizon, vx)
  half_road, walk = _ground(c, horizon, vx)
  road_fn = lambda d: (0.05 + road_k * d) * w  # noqa: E731  (the road's half width at depth d)
  walk_fn = lambda d: (road_fn(d), road_fn(d) + (0.02 + walk_k * d) * w)  # noqa: E731
  del half_road, walk
  _poles(c, horizon, vx, walk_fn)
  _objects(c, horizon, vx, road_fn, walk_fn)
  if rng.uniform() < 0.3:  # the ego vehicle's bonnet: labelled, ignored in training
    c.rect(0.92 * h, h, 0, w, EGO, texture=0.02)
  # Lighting: global light level, colour cast, and a soft diagonal shadow.
  yy, xx = np.ogrid[0:h, 0:w]
  shadow = 1.0 - rng.uniform(0.0, 0.35) * (
    np.sin((xx / w * rng.uniform(1, 3) + yy / h) * np.pi + rng.uniform(0, 6)) > 0.3
  )
  light = rng.uniform(0.6, 1.25) * np.asarray(1 + rng.normal(0, 0.06, 3), np.float32)
  img = c.img * light[None, None, :] * shadow[..., None].astype(np.float32)
  img += rng.normal(0, 0.02, img.shape).astype(np.float32) if rng.uniform() < 0.5 else 0.0
  return (np.clip(img, 0, 1) * 255).astype(np.uint8), c.lab


def _names(split: str, index: int) -> Tuple[str, str]:
  stem = f"{CITY}_{index // 1000:06d}_{index % 1000:06d}"
  return (
    os.path.join("leftImg8bit", split, CITY, f"{stem}_leftImg8bit.png"),
    os.path.join("gtFine", split, CITY, f"{stem}_gtFine_labelIds.png"),
  )


def write_dataset(root: str, num_train: int, num_val: int, size=(256, 512), seed: int = 0):
  """Writes the dataset under ``root`` (once); later calls with the same settings reuse it.

  Written into a temporary sibling directory and renamed into place when
  complete, so an interrupted run never leaves a half-written tree behind, and
  concurrent writers (several processes) end with one complete tree.
  """
  settings = {
    "num_train": int(num_train),
    "num_val": int(num_val),
    "size": list(size),
    "seed": int(seed),
    "version": 1,
  }
  marker = os.path.join(root, _MARKER)
  if os.path.exists(marker):
    with open(marker) as f:
      existing = json.load(f)
    if existing != settings:
      raise ValueError(
        f"{root} holds a generated dataset with other settings ({existing}); "
        f"wanted {settings}: choose another config.data.root"
      )
    return root
  if os.path.exists(root) and os.listdir(root):
    raise ValueError(
      f"{root} is not empty and holds no generated dataset ({_MARKER} missing); "
      "config.data.root for 'generated' must be an empty or new directory"
    )
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".generating-", dir=parent)
  try:
    for split, count, offset in (("train", num_train, 0), ("val", num_val, 10**6)):
      for i in range(count):
        image, label = generate_scene(seed, offset + i, tuple(size))
        img_path, lab_path = (os.path.join(tmp, p) for p in _names(split, i))
        os.makedirs(os.path.dirname(img_path), exist_ok=True)
        os.makedirs(os.path.dirname(lab_path), exist_ok=True)
        Image.fromarray(image).save(img_path, compress_level=1)
        Image.fromarray(label).save(lab_path, compress_level=1)
    with open(os.path.join(tmp, _MARKER), "w") as f:
      json.dump(settings, f)
    try:
      if os.path.exists(root):
        os.rmdir(root)  # empty (checked above), unless another writer just filled it
      os.rename(tmp, root)
    except OSError:  # another process finished first
      if not os.path.exists(marker):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root
