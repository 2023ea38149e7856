"""Procedural street scenes in several visual domains: the library's built-in dataset.

Every image is a perspective street (sky, skyline, facades or tree lines, sidewalks, a road
towards a vanishing point, cars/trucks/buses, persons, poles with signs and traffic lights)
labelled with Cityscapes train ids. Rendering has two independent halves:

* the **layout** (geometry and label mask) depends on ``(seed, index)`` only, so image
  ``index`` has the same mask in every domain;
* the **style** (palette, textures, illumination, weather, sensor) depends on
  ``(seed, domain, index)`` and is described per domain by one row of ``DOMAIN_STYLES``.

Masks are exact (the image is drawn at label resolution), so they contain no ignore (255)
pixels. A 128x256 image takes a few milliseconds on one CPU core (see docs/synthetic_data.md).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset

from .labels import CLASSES
from .sample import Transform, make_sample

SOURCE_DOMAIN = "clear"

_ID = {name: train_id for train_id, name in enumerate(CLASSES)}
ROAD, SIDEWALK, BUILDING, WALL, FENCE = (_ID[c] for c in ("road", "sidewalk", "building", "wall", "fence"))
POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = _ID["pole"], _ID["traffic light"], _ID["traffic sign"]
VEGETATION, TERRAIN, SKY, PERSON = _ID["vegetation"], _ID["terrain"], _ID["sky"], _ID["person"]
CAR, TRUCK, BUS = _ID["car"], _ID["truck"], _ID["bus"]

# What a region is made of: decides its colour, texture, snow cover and whether it emits light.
# The label of a region is separate (a car's tyres are material "tyre", label car).
MATERIALS: tuple[str, ...] = (
    "sky", "road", "marking", "sidewalk", "building", "window", "wall", "fence", "pole",
    "sign", "signal", "lamp", "vegetation", "trunk", "terrain", "skin", "clothes", "car",
    "glass", "tyre", "truck", "bus",
)
_M = {name: index for index, name in enumerate(MATERIALS)}

# Colours of the source domain; a domain's ``palette`` overrides some of them.
BASE_PALETTE: dict[str, tuple[int, int, int]] = {
    "sky": (110, 160, 225), "road": (88, 86, 92), "marking": (225, 225, 215),
    "sidewalk": (150, 138, 128), "building": (150, 120, 100), "window": (60, 72, 88),
    "wall": (165, 160, 150), "fence": (125, 100, 75), "pole": (115, 115, 120),
    "sign": (40, 80, 170), "signal": (45, 45, 45), "lamp": (235, 225, 185),
    "vegetation": (60, 105, 40), "trunk": (85, 62, 42), "terrain": (120, 145, 65),
    "skin": (205, 160, 130), "clothes": (90, 90, 110), "car": (140, 30, 30),
    "glass": (45, 55, 65), "tyre": (28, 28, 28), "truck": (200, 200, 195), "bus": (220, 170, 40),
}
# Regions of these materials draw their colour from a list instead of the palette.
_PAINTS = {
    "car": np.array([(235, 235, 235), (30, 30, 32), (160, 160, 165), (150, 25, 25),
                     (30, 60, 140), (40, 80, 50), (120, 100, 80), (90, 95, 100)], np.float32),
    "clothes": np.array([(30, 30, 35), (200, 200, 200), (40, 50, 110), (120, 30, 30),
                         (80, 80, 85), (140, 110, 70), (40, 90, 60), (180, 140, 40)], np.float32),
    "truck": np.array([(225, 225, 220), (170, 40, 30), (40, 70, 130), (90, 90, 90)], np.float32),
    "bus": np.array([(225, 175, 40), (200, 40, 40), (230, 230, 230), (40, 110, 170)], np.float32),
}

# Texture fields: grain (at a two-pixel scale, so mild blur weakens but does not erase it),
# stains, foliage blobs, horizontal courses, vertical slats, paving grid. Each material mixes
# them with these weights (a relative brightness modulation).
_TEXTURES = {
    "road": (0.18, 0.12, 0, 0, 0, 0), "marking": (0.05, 0.05, 0, 0, 0, 0),
    "sidewalk": (0.05, 0.06, 0, 0, 0, 0.45), "building": (0.05, 0.15, 0, 0.18, 0, 0),
    "window": (0.03, 0.2, 0, 0, 0, 0), "wall": (0.06, 0.06, 0, 0.4, 0, 0),
    "fence": (0.03, 0.03, 0, 0, 0.55, 0), "pole": (0.04, 0, 0, 0, 0, 0),
    "vegetation": (0.1, 0.08, 0.5, 0, 0, 0), "trunk": (0.1, 0, 0, 0, 0.2, 0),
    "terrain": (0.3, 0.18, 0, 0, 0, 0), "sky": (0, 0.15, 0, 0, 0, 0),
    "car": (0.02, 0.04, 0, 0, 0, 0), "truck": (0.03, 0.06, 0, 0, 0.25, 0), "bus": (0.03, 0.05, 0, 0, 0, 0),
}
_TEXTURE_WEIGHTS = np.zeros((len(MATERIALS), 6), np.float32)
for _name, _weights in _TEXTURES.items():
    _TEXTURE_WEIGHTS[_M[_name]] = _weights

# How readily snow settles on each material (0 = never).
_SNOW_COVER = np.zeros(len(MATERIALS), np.float32)
for _name, _cover in {"road": 0.55, "marking": 0.55, "sidewalk": 0.9, "terrain": 1.0,
                      "vegetation": 0.45, "building": 0.1, "wall": 0.35, "fence": 0.25}.items():
    _SNOW_COVER[_M[_name]] = _cover
# Materials that glow in the dark, and how strongly.
_EMISSION = np.zeros(len(MATERIALS), np.float32)
for _name, _strength in {"lamp": 1.0, "window": 0.45, "signal": 0.6}.items():
    _EMISSION[_M[_name]] = _strength


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks. Colours are RGB 0..255, factors are relative to the source domain."""

    palette: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # overrides of BASE_PALETTE
    sky_top: tuple[int, int, int] = (70, 120, 200)
    sky_horizon: tuple[int, int, int] = (185, 210, 235)
    colour_jitter: float = 0.12  # per-region colour spread (std of a multiplicative factor)
    texture_gain: float = 1.0
    ambient: float = 1.0  # global light level
    light_gradient: float = 0.15  # extra light towards the top of the image
    lights: float = 0.0  # strength of lamps, lit windows and traffic lights (night)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0
    contrast: float = 1.0
    fog: tuple[float, float] = (0.0, 0.03)  # range of the extinction per unit of depth (the road
    # at the image bottom has depth 1), drawn per image
    fog_colour: tuple[int, int, int] = (200, 200, 205)
    snow: float = 0.0  # snow cover on the ground, 0..1
    flakes: float = 0.0  # falling snow, flakes per 100 pixels
    noise: float = 0.01  # sensor noise std (image in 0..1)
    blur: float = 0.0  # softness: weight of a 3x3 box blur (wider for larger images) mixed in


DOMAIN_STYLES: dict[str, DomainStyle] = {
    "clear": DomainStyle(),
    "dusk": DomainStyle(
        sky_top=(60, 50, 110), sky_horizon=(240, 150, 90), ambient=0.65, light_gradient=0.35,
        lights=0.25, tint=(1.2, 0.85, 0.7), contrast=1.1, noise=0.02,
    ),
    "fog": DomainStyle(
        sky_top=(195, 195, 200), sky_horizon=(205, 205, 210), ambient=0.9, light_gradient=0.05,
        saturation=0.75, fog=(0.15, 0.25), texture_gain=0.8, noise=0.015, blur=0.6,
    ),
    "night": DomainStyle(
        sky_top=(5, 8, 20), sky_horizon=(30, 30, 50), ambient=0.65, light_gradient=0.0,
        lights=1.0, tint=(0.9, 0.95, 1.2), saturation=0.7, fog_colour=(20, 20, 30), noise=0.03, blur=0.3,
    ),
    "snow": DomainStyle(
        palette={"vegetation": (70, 90, 70), "terrain": (150, 155, 140)},
        sky_top=(175, 180, 190), sky_horizon=(215, 218, 225), ambient=1.0, light_gradient=0.05,
        saturation=0.75, snow=0.5, flakes=1.0, fog=(0.03, 0.08), fog_colour=(215, 218, 225), noise=0.02,
    ),
    "desert": DomainStyle(
        palette={"road": (150, 130, 110), "sidewalk": (210, 180, 130), "building": (205, 160, 105),
                 "wall": (210, 175, 125), "vegetation": (115, 115, 50), "terrain": (215, 180, 120),
                 "trunk": (110, 80, 50)},
        sky_top=(150, 180, 215), sky_horizon=(235, 220, 195), ambient=1.1, light_gradient=0.1,
        tint=(1.08, 1.0, 0.88), texture_gain=0.6, contrast=0.85, fog=(0.02, 0.06),
        fog_colour=(225, 205, 170), noise=0.01,
    ),
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_STYLES)


SKY_DEPTH = 40.0  # fog veils the sky like a scene this deep (the distant skyline is at 25)


class _Street(NamedTuple):
    """Columns where the ground lines reach the last row, and the vanishing point column."""

    road_left: float
    road_right: float
    walk_left: float
    walk_right: float
    vx: float


@dataclass
class _Layout:
    labels: np.ndarray  # (H, W) uint8 train ids
    region: np.ndarray  # (H, W) intp index into ``materials``: one colour per region
    materials: list[int]  # material of each region
    depth: np.ndarray  # (H, W) float32, 1 at the bottom of the road, SKY_DEPTH for the sky
    horizon: int


class _Canvas:
    """Label, region and depth maps painted back to front."""

    def __init__(self, height: int, width: int, horizon: int):
        self.height, self.width, self.horizon = height, width, horizon
        self.rows, self.cols = _grid(height, width)
        self.labels = np.full((height, width), SKY, np.uint8)
        self.region = np.zeros((height, width), np.intp)
        self.materials = [_M["sky"]]
        ground_rows = np.maximum(self.rows - horizon, 0.5)
        ground_depth = np.where(self.rows >= horizon, (height - horizon) / ground_rows, SKY_DEPTH)
        self.depth = np.repeat(ground_depth.astype(np.float32), width, axis=1)

    def new_region(self, material: str) -> int:
        self.materials.append(_M[material])
        return len(self.materials) - 1

    def base_depth(self, base_row: float) -> float:
        return (self.height - self.horizon) / max(base_row - self.horizon, 0.5)

    def paint(self, label, region, mask: np.ndarray, depth=None, first_row: int = 0) -> None:
        """Paint boolean ``mask`` covering rows ``first_row:``; ``label``, ``region`` and ``depth``
        broadcast to it (depth left unchanged when None)."""
        rows = slice(first_row, first_row + mask.shape[0])
        np.copyto(self.labels[rows], label, where=mask, casting="unsafe")
        np.copyto(self.region[rows], region, where=mask, casting="unsafe")
        if depth is not None:
            np.copyto(self.depth[rows], depth, where=mask, casting="unsafe")

    def paint_box(self, label: int, region: int, y0: float, y1: float, x0: float, x1: float,
                  depth: float, shape=None) -> None:
        """Paint the box rows [y0, y1) x cols [x0, x1), restricted to ``shape(rows, cols)`` if given."""
        r0, r1 = max(int(round(y0)), 0), min(int(round(y1)), self.height)
        c0, c1 = max(int(round(x0)), 0), min(int(round(x1)), self.width)
        if r0 >= r1 or c0 >= c1:
            return
        box = (slice(r0, r1), slice(c0, c1))
        if shape is None:
            self.labels[box], self.region[box], self.depth[box] = label, region, depth
            return
        mask = shape(self.rows[r0:r1], self.cols[:, c0:c1])
        self.labels[box][mask], self.region[box][mask], self.depth[box][mask] = label, region, depth

    def paint_columns(self, label, region: np.ndarray, top: np.ndarray, bottom: np.ndarray,
                      depth: np.ndarray) -> None:
        """Paint each column x over rows [top[x], bottom[x]) with per-column label (or one label),
        region and depth."""
        first = min(max(int(top.min()), 0), self.height)
        rows = self.rows[first:min(max(int(np.ceil(bottom.max())), first), self.height)]
        self.paint(label, region, (rows >= top) & (rows < bottom), depth, first)


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (H, 1) and column indices (1, W) as float32."""
    return (np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :])


def _ellipse(cy: float, cx: float, ry: float, rx: float):
    return lambda rows, cols: ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1.0


def _segments(rng: np.random.Generator, width: int, low: float, high: float) -> np.ndarray:
    """Per-column segment index for a random partition of ``width`` columns into widths in [low, high)."""
    widths = rng.uniform(low, high, size=int(width / low) + 2)
    return np.searchsorted(np.cumsum(widths), np.arange(width), side="right")


def _layout(rng: np.random.Generator, height: int, width: int) -> _Layout:
    horizon = int(height * rng.uniform(0.36, 0.5))
    ground = height - horizon
    canvas = _Canvas(height, width, horizon)
    rows, cols = canvas.rows, canvas.cols
    vx = width * rng.uniform(0.3, 0.7)  # vanishing point column
    # Ground lines run from the vanishing point to their column ``bottom_x`` on the last row:
    # x(row) = vx + t * (bottom_x - vx), with t = (row - horizon) / ground = 1 / depth.
    road_left, road_right = vx - width * rng.uniform(0.3, 0.65), vx + width * rng.uniform(0.3, 0.65)
    walk_left, walk_right = road_left - width * rng.uniform(0.2, 0.6), road_right + width * rng.uniform(0.2, 0.6)

    # Distant skyline around the vanishing point (buildings and tree clumps).
    segment = _segments(rng, width, 0.03 * width, 0.1 * width)
    n_segments = segment.max() + 1
    is_tree = rng.random(n_segments) < 0.3
    tops = horizon - height * rng.uniform(0.03, 0.16, n_segments) * np.where(is_tree, 0.6, 1.0)
    regions = np.array([canvas.new_region("vegetation" if tree else "building") for tree in is_tree])
    canvas.paint_columns(np.where(is_tree, VEGETATION, BUILDING)[segment], regions[segment], tops[segment],
                         np.full(width, horizon + 1.0), np.full(width, 25.0, np.float32))

    # Two sides of the street: a row of facades or an open verge with a tree line.
    facade_window = np.zeros((height, width), bool)
    for side, walk_x in ((-1, walk_left), (1, walk_right)):
        offset = side * (cols[0] - vx)  # columns' distance from the vanishing point, > 0 on this side
        gap = width * rng.uniform(0.02, 0.1)
        on_side = offset > gap
        base = horizon + ground * offset / abs(walk_x - vx)  # where the sidewalk's outer edge meets the column
        depth = (ground / np.maximum(base - horizon, 0.5)).astype(np.float32)
        if rng.random() < 0.7:
            segment = _segments(rng, width, 0.1 * width, 0.35 * width)
            n_segments = segment.max() + 1
            regions = np.array([canvas.new_region("building") for _ in range(n_segments)])
            stories = rng.uniform(1.2, 4.0, n_segments)[segment]
            top = np.where(on_side, horizon - stories * (base - horizon), height)
            canvas.paint_columns(BUILDING, regions[segment], top, base, depth)
            period_x, period_y = rng.uniform(0.04, 0.07) * width, rng.uniform(0.05, 0.09) * height
            phase_x, phase_y = rng.uniform(0, period_x), rng.uniform(0, period_y)
            windows = (((cols + phase_x) % period_x < 0.5 * period_x)
                       & ((rows + phase_y) % period_y < 0.45 * period_y)
                       & (rows >= top) & (rows < base - 0.6 * (base - horizon)))
            facade_window |= windows & on_side
            barrier_label, barrier_material, barrier_height = WALL, "wall", rng.uniform(0.25, 0.5)
        else:
            bumps = rng.uniform(0.5, 1.0, width // 4 + 2)[np.arange(width) // 4]
            top = np.where(on_side, horizon - height * rng.uniform(0.1, 0.25) * bumps, height)
            canvas.paint_columns(VEGETATION, np.full(width, canvas.new_region("vegetation")), top,
                                 np.minimum(base, horizon + 0.15 * ground), depth)
            barrier_label, barrier_material, barrier_height = FENCE, "fence", rng.uniform(0.3, 0.6)
        if rng.random() < 0.5:  # a wall along the facades, or a fence along the verge
            start = gap + rng.uniform(0, 0.3) * width
            span = on_side & (offset > start) & (offset < start + rng.uniform(0.2, 0.6) * width)
            canvas.paint_columns(barrier_label, np.full(width, canvas.new_region(barrier_material)),
                                 np.where(span, base - barrier_height * (base - horizon), height), base, depth)

    window_region = canvas.new_region("window")
    canvas.paint(BUILDING, window_region, facade_window)
    # The ground (rows from the horizon down): terrain where nothing stands, sidewalks, road.
    t_ground = (rows[horizon:] - horizon) / ground

    def between(left_bottom_x: float, right_bottom_x: float) -> np.ndarray:
        return (cols >= vx + t_ground * (left_bottom_x - vx)) & (cols < vx + t_ground * (right_bottom_x - vx))

    canvas.paint(TERRAIN, canvas.new_region("terrain"), canvas.labels[horizon:] == SKY, first_row=horizon)
    canvas.paint(SIDEWALK, canvas.new_region("sidewalk"), between(walk_left, walk_right), first_row=horizon)
    canvas.paint(ROAD, canvas.new_region("road"), between(road_left, road_right), first_row=horizon)
    # Dashed centre line; dashes are periodic in depth so they shrink with distance.
    centre = vx + t_ground * (road_left + (road_right - road_left) * rng.uniform(0.4, 0.6) - vx)
    dash = (np.floor(rng.uniform(3, 5) / np.maximum(t_ground, 1e-3) + rng.uniform(0, 1)) % 2) == 0
    canvas.paint(ROAD, canvas.new_region("marking"),
                 dash & (np.abs(cols - centre) < 0.5 + 0.012 * width * t_ground), first_row=horizon)

    # Objects, drawn far to near. Heights follow the camera-height rule: an object as tall as
    # the camera height spans from its base row up to the horizon.
    objects = []
    for _ in range(rng.integers(1, 6)):
        objects.append((horizon + ground * rng.uniform(0.12, 1.1), _draw_vehicle))
    for _ in range(rng.integers(0, 6)):
        objects.append((horizon + ground * rng.uniform(0.15, 1.05), _draw_person))
    for _ in range(rng.integers(2, 6)):
        objects.append((horizon + ground * rng.uniform(0.15, 0.8), _draw_pole))
    for _ in range(rng.integers(0, 3)):
        objects.append((horizon + ground * rng.uniform(0.15, 0.9), _draw_tree))
    objects.sort(key=lambda item: item[0])
    street = _Street(road_left, road_right, walk_left, walk_right, vx)
    for base_row, draw in objects:
        draw(canvas, rng, base_row, street)
    return _Layout(canvas.labels, canvas.region, canvas.materials, canvas.depth, horizon)


def _ground_x(canvas: _Canvas, vx: float, bottom_x: float, base_row: float) -> float:
    return vx + (base_row - canvas.horizon) / (canvas.height - canvas.horizon) * (bottom_x - vx)


def _on_sidewalk(canvas: _Canvas, rng: np.random.Generator, base_row: float, street: _Street,
                 near_road: bool) -> float:
    """A random column on either sidewalk at ``base_row`` (close to the kerb if ``near_road``)."""
    if rng.random() < 0.5:
        kerb, outer = street.road_left, street.walk_left
    else:
        kerb, outer = street.road_right, street.walk_right
    u = rng.uniform(0.05, 0.2) if near_road else rng.uniform(0.1, 0.9)
    return _ground_x(canvas, street.vx, kerb + u * (outer - kerb), base_row)


def _draw_vehicle(canvas: _Canvas, rng: np.random.Generator, base_row: float, street: _Street) -> None:
    road_left, road_right, vx = street.road_left, street.road_right, street.vx
    scale = base_row - canvas.horizon
    left, right = _ground_x(canvas, vx, road_left, base_row), _ground_x(canvas, vx, road_right, base_row)
    depth = canvas.base_depth(base_row)
    kind = rng.choice(3, p=(0.8, 0.1, 0.1))
    width = (right - left) * rng.uniform(0.25, 0.38) * (1.15 if kind else 1.0)
    if width < 3:
        return
    x0 = left + rng.uniform(0.0, 1.0) * (right - left - width)
    x1 = x0 + width
    if kind == 0:
        height = scale * rng.uniform(0.85, 1.1)
        body = canvas.new_region("car")
        canvas.paint_box(CAR, body, base_row - 0.55 * height, base_row - 0.1 * height, x0, x1, depth)
        inset = 0.12 * width
        canvas.paint_box(CAR, body, base_row - height, base_row - 0.5 * height, x0 + inset, x1 - inset, depth)
        canvas.paint_box(CAR, canvas.new_region("glass"), base_row - 0.92 * height, base_row - 0.6 * height,
                         x0 + 1.6 * inset, x1 - 1.6 * inset, depth)
        tyre = canvas.new_region("tyre")
        for tx in (x0 + 0.04 * width, x1 - 0.22 * width):
            canvas.paint_box(CAR, tyre, base_row - 0.18 * height, base_row, tx, tx + 0.18 * width, depth)
        lamp = canvas.new_region("lamp")
        for lx in (x0 + 0.05 * width, x1 - 0.17 * width):
            canvas.paint_box(CAR, lamp, base_row - 0.48 * height, base_row - 0.4 * height, lx, lx + 0.12 * width, depth)
        return
    label, material = (TRUCK, "truck") if kind == 1 else (BUS, "bus")
    height = scale * rng.uniform(1.6, 2.1)
    canvas.paint_box(label, canvas.new_region(material), base_row - height, base_row - 0.08 * height, x0, x1, depth)
    glass = canvas.new_region("glass")
    if kind == 1:  # cab window low in front of the box
        canvas.paint_box(label, glass, base_row - 0.45 * height, base_row - 0.3 * height,
                         x0 + 0.1 * width, x1 - 0.1 * width, depth)
    else:  # large windscreen and a destination board
        canvas.paint_box(label, glass, base_row - 0.75 * height, base_row - 0.4 * height,
                         x0 + 0.06 * width, x1 - 0.06 * width, depth)
        canvas.paint_box(label, canvas.new_region("lamp"), base_row - 0.92 * height, base_row - 0.82 * height,
                         x0 + 0.2 * width, x1 - 0.2 * width, depth)
    tyre = canvas.new_region("tyre")
    for tx in (x0 + 0.05 * width, x1 - 0.2 * width):
        canvas.paint_box(label, tyre, base_row - 0.1 * height, base_row, tx, tx + 0.15 * width, depth)


def _draw_person(canvas: _Canvas, rng: np.random.Generator, base_row: float, street: _Street) -> None:
    height = (base_row - canvas.horizon) * rng.uniform(0.95, 1.25)
    if height < 6:
        return
    x = _on_sidewalk(canvas, rng, base_row, street, near_road=False)
    depth, half = canvas.base_depth(base_row), 0.13 * height
    head = 0.09 * height
    canvas.paint_box(PERSON, canvas.new_region("skin"), base_row - height, base_row - height + 2 * head,
                     x - head, x + head, depth, _ellipse(base_row - height + head, x, head, head * 0.85))
    canvas.paint_box(PERSON, canvas.new_region("clothes"), base_row - height + 1.8 * head, base_row - 0.45 * height,
                     x - half, x + half, depth)
    legs = canvas.new_region("clothes")
    stride = rng.uniform(0.0, 0.5) * half
    for leg_x in (x - half * 0.9 - stride, x + 0.1 * half + stride):
        canvas.paint_box(PERSON, legs, base_row - 0.47 * height, base_row, leg_x, leg_x + 0.8 * half, depth)


def _draw_pole(canvas: _Canvas, rng: np.random.Generator, base_row: float, street: _Street) -> None:
    scale = base_row - canvas.horizon
    height = scale * rng.uniform(2.4, 3.5)
    if height < 8:
        return
    x = _on_sidewalk(canvas, rng, base_row, street, near_road=True)
    depth, half = canvas.base_depth(base_row), max(1.0, 0.05 * scale)
    canvas.paint_box(POLE, canvas.new_region("pole"), base_row - height, base_row, x - half, x + half, depth)
    attachment = rng.random()
    if attachment < 0.5:  # sign: a panel or a disc, about 2 camera heights up
        size = scale * rng.uniform(0.45, 0.65)
        cy = base_row - scale * rng.uniform(1.5, 2.1)
        shape = _ellipse(cy, x, size / 2, size / 2) if rng.random() < 0.5 else None
        canvas.paint_box(TRAFFIC_SIGN, canvas.new_region("sign"), cy - size / 2, cy + size / 2,
                         x - size / 2, x + size / 2, depth, shape)
    elif attachment < 0.9:  # traffic light: a housing with three lamps, one of them on
        box_w, box_h = scale * 0.3, scale * 0.8
        y0 = base_row - scale * rng.uniform(2.0, 2.3)
        canvas.paint_box(TRAFFIC_LIGHT, canvas.new_region("signal"), y0, y0 + box_h, x - box_w / 2, x + box_w / 2, depth)
        lamp = rng.integers(3)
        canvas.paint_box(TRAFFIC_LIGHT, canvas.new_region("lamp"), y0 + box_h * (0.08 + 0.3 * lamp),
                         y0 + box_h * (0.3 + 0.3 * lamp), x - box_w / 4, x + box_w / 4, depth)
    else:  # street lamp head
        top = base_row - height
        canvas.paint_box(POLE, canvas.new_region("lamp"), top, top + 0.06 * height, x - 4 * half, x + half, depth)


def _draw_tree(canvas: _Canvas, rng: np.random.Generator, base_row: float, street: _Street) -> None:
    scale = base_row - canvas.horizon
    if scale < 4:
        return
    outer = street.walk_left if rng.random() < 0.5 else street.walk_right
    x = _ground_x(canvas, street.vx, outer, base_row)
    depth = canvas.base_depth(base_row)
    trunk_half = max(0.5, 0.06 * scale)
    canvas.paint_box(VEGETATION, canvas.new_region("trunk"), base_row - 1.6 * scale, base_row,
                     x - trunk_half, x + trunk_half, depth)
    radius = scale * rng.uniform(0.7, 1.2)
    cy = base_row - 1.5 * scale - 0.6 * radius
    ragged = rng.uniform(0.75, 1.25, 8)  # an irregular outline: the radius varies per sector

    def crown(rows, cols):
        dy, dx = (rows - cy) / radius, (cols - x) / radius
        sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * 7.999).astype(int)
        return dy**2 + dx**2 < ragged[sector] ** 2

    canvas.paint_box(VEGETATION, canvas.new_region("vegetation"), cy - 1.3 * radius, cy + 1.3 * radius,
                     x - 1.3 * radius, x + 1.3 * radius, depth, crown)


@lru_cache(maxsize=8)
def _bilinear_weights(size: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index and fractional weight of each of ``size`` pixels on a grid of ``cell`` pixels."""
    position = np.arange(size, dtype=np.float32) / cell
    index = position.astype(np.intp)
    return index, position - index.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Noise in [-1, 1] varying smoothly over ``cell`` pixels (bilinear upsampling of a coarse grid)."""
    grid = rng.uniform(-1, 1, (height // cell + 2, width // cell + 2)).astype(np.float32)
    (iy, fy), (ix, fx) = _bilinear_weights(height, cell), _bilinear_weights(width, cell)
    tall = grid[iy] * (1 - fy[:, None]) + grid[iy + 1] * fy[:, None]
    return np.take(tall, ix, axis=1) * (1 - fx) + np.take(tall, ix + 1, axis=1) * fx


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Box blur over the last two axes, edges replicated."""
    height, width = image.shape[-2:]
    padded = np.pad(image, [(0, 0)] * (image.ndim - 2) + [(radius, radius)] * 2, mode="edge")
    rows = padded[..., :height, :].copy()  # in-place sums: few large temporaries
    for shift in range(1, 2 * radius + 1):
        rows += padded[..., shift:shift + height, :]
    blurred = rows[..., :width].copy()
    for shift in range(1, 2 * radius + 1):
        blurred += rows[..., shift:shift + width]
    blurred /= (2 * radius + 1) ** 2
    return blurred


@lru_cache(maxsize=8)
def _pattern_fields(height: int, width: int) -> np.ndarray:
    """The regular texture fields (courses, slats, paving grid), (3, H, W) in [-1, 1]."""
    rows, cols = _grid(height, width)
    scale = height / 128
    courses = np.where(rows % max(2, round(4 * scale)) < 1, -1.0, 0.25) * np.ones_like(cols)
    slats = np.where(cols % max(2, round(3 * scale)) < 1, -1.0, 0.3) * np.ones_like(rows)
    tile = max(3, round(6 * scale))
    grid = np.where((rows % tile < 1) | (cols % tile < 1), -1.0, 0.15)
    return np.stack([courses, slats, grid]).astype(np.float32)


def _palette(style: DomainStyle) -> np.ndarray:
    colours = {**BASE_PALETTE, **style.palette}
    return np.array([colours[name] for name in MATERIALS], np.float32) / 255.0


def _render_style(layout: _Layout, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    # Planar (3, H, W) float32 throughout: per-pixel maps broadcast over channels cheaply.
    height, width = layout.labels.shape
    rows, cols = _grid(height, width)
    materials = np.array(layout.materials)
    material_map = np.take(materials, layout.region)

    # Albedo: one colour per region, jittered; paints drawn from a list for vehicles and clothes.
    colours = _palette(style)[materials]
    for name, paints in _PAINTS.items():
        chosen = materials == _M[name]
        colours[chosen] = paints[rng.integers(len(paints), size=chosen.sum())] / 255.0
    jitter = np.exp(style.colour_jitter * (rng.standard_normal((len(materials), 1))
                                           + 0.4 * rng.standard_normal((len(materials), 3))))
    colours *= jitter
    image = np.take(colours.T.astype(np.float32), layout.region, axis=1)
    sky_blend = np.clip(rows / max(layout.horizon, 1), 0, 1)
    sky = (_column(style.sky_top) * (1 - sky_blend) + _column(style.sky_horizon) * sky_blend) / 255.0
    sky *= _column(jitter[0])  # region 0 is the sky
    image = np.where(material_map == _M["sky"], sky, image)

    # Texture: a per-material mix of random and regular fields modulates brightness.
    grain = _smooth_noise(rng, height, width, max(1, height // 64))
    fields = np.concatenate([
        grain[None],
        _smooth_noise(rng, height, width, max(2, height // 16))[None],
        _smooth_noise(rng, height, width, max(2, height // 40))[None],
        _pattern_fields(height, width),
    ])
    weights = np.take(_TEXTURE_WEIGHTS.T, material_map, axis=1)
    image *= 1 + style.texture_gain * np.einsum("khw,khw->hw", weights, fields)

    if style.snow:
        patches = _smooth_noise(rng, height, width, max(2, height // 20))
        cover = np.clip(style.snow * 1.6 * np.take(_SNOW_COVER, material_map) + 0.5 * patches - 0.3, 0, 1)
        image += cover * (0.92 + 0.05 * grain - image)

    # Illumination: ambient level, brighter towards the top, a random left-right gradient.
    side = rng.uniform(-0.1, 0.1) * (cols / width - 0.5)
    image *= style.ambient * rng.uniform(0.85, 1.15) * (1 + style.light_gradient * (0.5 - rows / height) + side)
    if style.lights:
        lit_regions = rng.random(len(materials)) < 0.6  # some lamps and signals are off
        lit_cells = rng.random((height // 4, width // 4)) < 0.45  # and most windows
        lit_cells = lit_cells.repeat(4, axis=0).repeat(4, axis=1)
        is_lit = np.where(material_map == _M["window"], lit_cells, np.take(lit_regions, layout.region))
        emission = np.take(_EMISSION, material_map) * is_lit
        emission += 0.6 * _box_blur(emission, max(1, height // 40))
        image += style.lights * emission * _column((1.0, 0.85, 0.55))

    # Colour grading.
    image *= _column(style.tint) * rng.uniform(0.95, 1.05, (3, 1, 1)).astype(np.float32)
    grey = image.sum(axis=0) / 3
    image = grey + style.saturation * (image - grey)
    image = 0.5 + style.contrast * (image - 0.5)

    fog = rng.uniform(*style.fog)
    if fog:
        transmission = np.exp(-fog * (layout.depth - 1))
        image = image * transmission + (1 - transmission) * _column(style.fog_colour) / 255.0
    if style.flakes:
        count = int(style.flakes * height * width / 100)
        y, x = rng.integers(0, height - 1, count), rng.integers(0, width - 1, count)
        for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)):
            image[:, y + dy, x + dx] = 0.5 * image[:, y + dy, x + dx] + 0.47
    if style.blur:
        image += style.blur * (_box_blur(image, max(1, round(height / 128))) - image)
    # Uniform sensor noise with standard deviation ``style.noise``.
    image += (style.noise * 3**0.5) * _uniform_bytes(rng, image.shape)
    planes = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    out = np.empty((height, width, 3), np.uint8)
    for channel in range(3):
        out[..., channel] = planes[channel]
    return out


def _column(rgb) -> np.ndarray:
    """An RGB triple as a (3, 1, 1) float32 array, to broadcast over planar images."""
    return np.asarray(rgb, np.float32).reshape(3, 1, 1)


def _uniform_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform noise in [-1, 1] from random bytes (several times faster than ``rng.random``)."""
    raw = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8).reshape(shape)
    return raw.astype(np.float32) * (2 / 255) - 1


def _check_arguments(domain: str, height: int, width: int) -> DomainStyle:
    if domain not in DOMAIN_STYLES:
        raise ValueError(f"unknown synthetic domain {domain!r}; known domains: {', '.join(DOMAINS)}")
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 32, got {height}x{width}")
    return DOMAIN_STYLES[domain]


def render_scene(seed: int, domain: str, index: int, height: int = 128, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` (>= 0) of ``domain``: (uint8 (H, W, 3) RGB, uint8 (H, W) train ids).

    A pure function of its arguments; the mask does not depend on ``domain``.
    """
    style = _check_arguments(domain, height, width)
    # Independent streams for layout and style; crc32 keeps the domain's seed stable across
    # processes (Python's str hash is salted per process).
    layout = _layout(np.random.default_rng([seed, index, 0]), height, width)
    style_rng = np.random.default_rng([seed, index, 1, zlib.crc32(domain.encode())])
    return _render_style(layout, style, style_rng), layout.labels


class SyntheticDomainDataset(Dataset):
    """``length`` procedural scenes of one domain; item k is scene ``first_index + k``."""

    def __init__(
        self,
        domain: str,
        length: int,
        seed: int = 0,
        size: tuple[int, int] = (128, 256),
        first_index: int = 0,
        transform: Transform | None = None,
    ):
        _check_arguments(domain, *size)
        self.domain, self.length, self.seed = domain, length, seed
        self.size, self.first_index, self.transform = size, first_index, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict:
        return self.sample(k)

    def sample(self, k: int, **transform_args) -> dict:
        """Scene ``k``, with extra named inputs for the transform (e.g. ``crop_class``)."""
        image, mask = self.load(k)
        return make_sample(image, mask, self.domain, f"{self.domain}_{self.first_index + k:06d}",
                           self.transform, **transform_args)

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 image and train-id mask of scene ``k``, before the transform."""
        if not 0 <= k < self.length:
            raise IndexError(f"index {k} out of range for {self.length} scenes")
        return render_scene(self.seed, self.domain, self.first_index + k, *self.size)

    def load_mask(self, k: int) -> np.ndarray:
        return self.load(k)[1]
