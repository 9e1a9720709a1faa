"""Synthetic street scenes: deterministic, seeded, procedural driving frames with exact labelIds.

A one-point-perspective street is ray-cast per pixel (ground plane, two facade planes, sky), then
street furniture, trees, cars and people are drawn far to near. Every primitive paints the RGB
frame and the label map in the same call with the same geometry, so the ground truth is exact.
``SceneSequence(seed, width, height).frame(i)`` is a pure function of ``(seed, size, i)``: frames
can be rendered in any order, by any process, and always come out the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from flowcloud.labels import LABEL_BY_NAME, LABEL_IDS

ROAD = LABEL_BY_NAME["road"].label_id
SIDEWALK = LABEL_BY_NAME["sidewalk"].label_id
BUILDING = LABEL_BY_NAME["building"].label_id
POLE = LABEL_BY_NAME["pole"].label_id
TRAFFIC_SIGN = LABEL_BY_NAME["traffic sign"].label_id
VEGETATION = LABEL_BY_NAME["vegetation"].label_id
SKY = LABEL_BY_NAME["sky"].label_id
PERSON = LABEL_BY_NAME["person"].label_id
CAR = LABEL_BY_NAME["car"].label_id
# The labelIds a synthetic frame can contain.
SYNTH_LABEL_IDS = (ROAD, SIDEWALK, BUILDING, POLE, TRAFFIC_SIGN, VEGETATION, SKY, PERSON, CAR)

FPS = 30.0
CAMERA_HEIGHT = 1.5  # metres above the road
FAR = 160.0  # metres: facades further away than this are not drawn
NEAR = 1.5  # metres: objects closer than this are behind the lens
_SUBPIXEL_BITS = 4  # cv2 drawing precision: coordinates in 1/16 pixel
_SCALE = float(1 << _SUBPIXEL_BITS)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _hash01(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random number in [0, 1) for each integer in ``index`` (splitmix64)."""
    with np.errstate(over="ignore"):
        x = np.asarray(index, dtype=np.int64).astype(np.uint64) * _M1
        x ^= np.uint64((seed * 1_000_003 + salt * 7919) & 0xFFFFFFFFFFFFFFFF) * _M3
        x ^= x >> np.uint64(30)
        x *= _M2
        x ^= x >> np.uint64(27)
        x *= _M3
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _frac(x: np.ndarray) -> np.ndarray:
    """The fractional part of ``x`` (faster than ``np.mod`` on floats)."""
    return x - np.floor(x)


def _lookup(texture: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``texture[rows % 256, cols % 256]`` for a 256x256 texture, via one flat take."""
    flat = ((np.asarray(rows, np.int32) & 255) << 8) | (np.asarray(cols, np.int32) & 255)
    return texture.ravel().take(flat)


def _value_noise(rng: np.random.Generator, size: int, octaves: tuple[int, ...]) -> np.ndarray:
    """Tileable-ish multi-octave value noise in [-1, 1], ``size`` x ``size`` float32."""
    out = np.zeros((size, size), np.float32)
    total = 0.0
    for i, cells in enumerate(octaves):
        grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
        weight = 0.6**i
        out += weight * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        total += weight
    return np.clip(out / total, -1.0, 1.0)


@dataclass(frozen=True)
class Car:
    lane_x: float  # lateral position of its centre (metres, road centre = 0)
    z0: float  # world position along the street at t = 0
    speed: float  # metres per second (negative: oncoming)
    width: float
    height: float
    length: float
    color: tuple[float, float, float]


@dataclass(frozen=True)
class Person:
    x: float
    z0: float
    speed: float
    height: float
    shirt: tuple[float, float, float]
    trousers: tuple[float, float, float]
    skin: tuple[float, float, float]
    phase: float
    crossing: bool  # walks across the road instead of along the sidewalk


class SceneSequence:
    """One seeded street: ``frame(i)`` renders frame ``i`` as (RGB uint8 HxWx3, labelIds uint8 HxW).

    ``clean=True`` draws every class in its official Cityscapes colour with no texture, light or
    noise: the geometry is unchanged, which lets tests check the labels against the drawing.
    """

    def __init__(self, seed: int, width: int = 640, height: int = 480, clean: bool = False) -> None:
        if not (16 <= width <= 8192 and 16 <= height <= 8192):
            raise ValueError(f"frame size {width}x{height} is outside 16..8192")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed = int(seed)
        self.width = int(width)
        self.height = int(height)
        self.clean = clean
        rng = np.random.default_rng([self.seed, 0x5EED])
        self.focal = width * rng.uniform(0.75, 1.05)
        self.horizon = rng.uniform(0.36, 0.5)  # fraction of the height
        self.road_half = rng.uniform(3.2, 6.5)
        self.curb = 0.25
        self.wall_left = self.road_half + rng.uniform(2.5, 6.0)
        self.wall_right = self.road_half + rng.uniform(2.5, 6.0)
        self.block_len = rng.uniform(9.0, 20.0)
        self.veg_share = rng.uniform(0.1, 0.45)
        self.cam_speed = float(
            rng.choice([0.0, rng.uniform(2.0, 6.0), rng.uniform(6.0, 14.0)], p=[0.15, 0.35, 0.5])
        )
        self.yaw_amp = rng.uniform(0.0, 0.08)
        self.yaw_period = rng.uniform(4.0, 12.0)
        self.drift_amp = rng.uniform(0.0, 1.2)
        self.cam_x0 = rng.uniform(-0.4, 0.5) * self.road_half
        self.pole_spacing = rng.uniform(12.0, 30.0)
        self.tree_spacing = rng.uniform(8.0, 25.0) if rng.random() < 0.8 else 0.0
        self.dashed = rng.random() < 0.8
        # Appearance: colours, light and camera response for the whole sequence.
        self.sky_top = rng.uniform([20, 60, 120], [140, 170, 235]).astype(np.float32)
        overcast = rng.random() < 0.3
        if overcast:
            grey = rng.uniform(120, 215)
            self.sky_top = np.array([grey, grey, grey * rng.uniform(1.0, 1.1)], np.float32)
        self.sky_horizon = np.clip(self.sky_top + rng.uniform(30, 90), 0, 255).astype(np.float32)
        if rng.random() < 0.15:  # dusk
            self.sky_horizon = rng.uniform([200, 120, 80], [255, 180, 140]).astype(np.float32)
        self.cloudiness = rng.uniform(0.0, 60.0)
        self.asphalt = rng.uniform(55, 125)
        self.asphalt_tint = rng.uniform(-6, 6, 3).astype(np.float32)
        self.paving = rng.uniform([95, 90, 85], [200, 180, 175]).astype(np.float32)
        self.marking = rng.uniform(170, 245)
        self.gain = rng.uniform(0.65, 1.25)
        self.tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        self.gamma = rng.uniform(0.8, 1.25)
        self.noise_sigma = rng.uniform(2.0, 9.0)
        self.gamma_lut = (255.0 * (np.arange(256) / 255.0) ** self.gamma + 0.5).astype(np.uint8)
        self.shadow_side = float(rng.choice([-1.0, 1.0]))
        self.shadow_width = rng.uniform(0.0, 1.0) * (self.road_half * 2 + 4)
        self.shadow_strength = rng.uniform(0.45, 0.8)
        self.blur = rng.random() < 0.3
        # Textures (indexed by world coordinates so they stick to surfaces as the camera moves).
        self.tex = _value_noise(rng, 256, (4, 16, 64, 128))
        self.tex_fine = _value_noise(rng, 256, (64, 256))
        self.grain = (rng.standard_normal((height + 32, width + 32, 1)).astype(np.float32)) * np.float32(
            self.noise_sigma
        )
        self.cars = self._make_cars(rng)
        self.people = self._make_people(rng)

    # -- scene content --------------------------------------------------------------------------

    def _make_cars(self, rng: np.random.Generator) -> list[Car]:
        cars = []
        lanes = [-self.road_half / 2, self.road_half / 2]
        for lane in lanes:
            oncoming = lane < 0
            for _ in range(int(rng.integers(2, 7))):
                width = rng.uniform(1.6, 2.0)
                cars.append(
                    Car(
                        lane_x=lane + rng.uniform(-0.4, 0.4),
                        z0=rng.uniform(0, 140),
                        speed=(-1 if oncoming else 1) * rng.uniform(0.0, 14.0),
                        width=width,
                        height=rng.uniform(1.35, 1.8),
                        length=rng.uniform(3.8, 5.0),
                        color=tuple(
                            rng.uniform(10, 235, 3) if rng.random() < 0.7 else [rng.uniform(15, 230)] * 3
                        ),
                    )
                )
        # Parked cars along the curbs.
        for side in (-1.0, 1.0):
            for _ in range(int(rng.integers(0, 4))):
                cars.append(
                    Car(
                        lane_x=side * (self.road_half - 1.1),
                        z0=rng.uniform(0, 140),
                        speed=0.0,
                        width=rng.uniform(1.6, 1.9),
                        height=rng.uniform(1.35, 1.7),
                        length=rng.uniform(3.8, 4.8),
                        color=tuple(rng.uniform(10, 235, 3)),
                    )
                )
        return cars

    def _make_people(self, rng: np.random.Generator) -> list[Person]:
        people = []
        for _ in range(int(rng.integers(3, 13))):
            side = float(rng.choice([-1.0, 1.0]))
            wall = self.wall_left if side < 0 else self.wall_right
            crossing = rng.random() < 0.12
            people.append(
                Person(
                    x=side * rng.uniform(self.road_half + 0.6, wall - 0.4),
                    z0=rng.uniform(0, 80),
                    speed=rng.uniform(0.8, 1.8) * (1 if rng.random() < 0.5 else -1),
                    height=rng.uniform(1.5, 1.95),
                    shirt=tuple(rng.uniform(0, 255, 3)),
                    trousers=tuple(rng.uniform(0, 200, 3)),
                    skin=tuple(rng.uniform([120, 80, 60], [240, 200, 170])),
                    phase=rng.uniform(0, 2 * math.pi),
                    crossing=crossing,
                )
            )
        return people

    # -- camera ---------------------------------------------------------------------------------

    def camera(self, index: int) -> tuple[float, float, float, float]:
        """(travelled metres, lateral offset, vanishing point x, horizon y) at frame ``index``."""
        time = index / FPS
        travelled = self.cam_speed * time
        phase = 2 * math.pi * time / self.yaw_period
        cam_x = self.cam_x0 + self.drift_amp * math.sin(phase * 0.37 + self.seed)
        yaw = self.yaw_amp * math.sin(phase)
        bob = 0.004 * math.sin(time * 9.0) * (self.cam_speed > 0)
        vx = self.width / 2 + self.focal * math.tan(yaw)
        vy = self.height * (self.horizon + bob + 0.02 * math.sin(phase * 0.61))
        return travelled, cam_x, vx, vy

    # -- rendering ------------------------------------------------------------------------------

    def frame(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``index`` as (RGB uint8 HxWx3, Cityscapes labelIds uint8 HxW)."""
        if index < 0:
            raise ValueError(f"frame index must be non-negative, got {index}")
        travelled, cam_x, vx, vy = self.camera(index)
        image, labels = self._background(index, travelled, cam_x, vx, vy)
        for draw in sorted(self._sprites(index, travelled, cam_x), key=lambda s: -s[0]):
            draw[1](image, labels, vx, vy)
        if self.clean:
            return image.astype(np.uint8), labels
        return self._camera_response(image, index), labels

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        index = 0
        while True:
            yield self.frame(index)
            index += 1

    def _colour(self, label: int, rgb: tuple[float, float, float] | np.ndarray) -> tuple[float, float, float]:
        if self.clean:
            c = LABEL_IDS.colors[label]
            return (float(c[0]), float(c[1]), float(c[2]))
        return (float(rgb[0]), float(rgb[1]), float(rgb[2]))

    def _background(
        self, index: int, travelled: float, cam_x: float, vx: float, vy: float
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w, f = self.height, self.width, np.float32(self.focal)
        big = np.float32(1e6)  # "at infinity", kept finite so no inf/nan reaches the arithmetic
        dy = (np.arange(h, dtype=np.float32) + np.float32(0.5 - vy))[:, None]  # (H, 1)
        dx = (np.arange(w, dtype=np.float32) + np.float32(0.5 - vx))[None, :]  # (1, W)
        below = dy > 0
        z_ground = np.where(below, np.float32(CAMERA_HEIGHT) * f / np.where(below, dy, 1), big)  # (H, 1)
        wall_x = np.where(dx < 0, -self.wall_left - cam_x, self.wall_right - cam_x).astype(np.float32)
        z_wall = np.where(dx != 0, wall_x * f / np.where(dx != 0, dx, 1), big).astype(np.float32)
        z_wall = np.where(z_wall > FAR, big, z_wall)  # (1, W)
        # Facade blocks: which block each column's ray hits, its kind and height.
        u_wall = np.where(z_wall < big, z_wall + np.float32(travelled), np.float32(0))
        block = np.floor(u_wall / self.block_len).astype(np.int64) * 2 + (dx >= 0)
        is_veg = _hash01(self.seed, 1, block) < self.veg_share
        block_h = 6.0 + 22.0 * _hash01(self.seed, 2, block) ** 1.5
        veg_top = (
            3.0 + 5.0 * _hash01(self.seed, 3, block) + 1.5 * self.tex[(u_wall * 4).astype(np.int64) & 255, 7]
        )
        block_h = np.where(is_veg, veg_top, block_h).astype(np.float32)
        height_on_wall = np.float32(CAMERA_HEIGHT) - dy * (z_wall / f)  # (H, W) metres above ground
        wall = (z_wall < z_ground) & (height_on_wall <= block_h) & (z_wall < big)
        ground = ~wall & below
        x_ground = dx * (z_ground / f) + np.float32(cam_x)  # (H, W) lateral metres
        ax = np.abs(x_ground)
        road = ground & (ax < self.road_half)
        veg_wall = wall & is_veg
        labels = np.full((h, w), SKY, np.uint8)
        labels[wall] = BUILDING
        labels[veg_wall] = VEGETATION
        labels[ground] = SIDEWALK
        labels[road] = ROAD
        if self.clean:
            return LABEL_IDS.palette[labels].astype(np.float32), labels

        # Colour = a base colour looked up per pixel (sky per row, facade per column, ground per
        # class) times a shade map (texture, windows, tiles, shadow) plus a brightness map (marks).
        rows = np.clip(np.arange(h, dtype=np.float32) / max(vy, 1.0), 0, 1)[:, None]
        hue = _hash01(self.seed, 4, block)[0]
        facade_rgb = np.stack(
            [90 + 120 * hue, 80 + 100 * _hash01(self.seed, 5, block)[0], 70 + 110 * hue**2], -1
        )
        table = np.concatenate(
            [
                self.sky_top * (1 - rows) + self.sky_horizon * rows,  # 0..h-1: sky by row
                facade_rgb,  # h..h+w-1: facade by column
                np.array([[55, 95, 35]]),  # h+w: vegetation blocks
                (self.asphalt + self.asphalt_tint)[None],  # h+w+1: road
                self.paving[None],  # h+w+2: sidewalk
                (self.paving * 1.12)[None],  # h+w+3: curb
            ]
        ).astype(np.float32)
        curb = ax < self.road_half + self.curb
        colour_of = np.where(
            wall, h + np.arange(w, dtype=np.int32)[None, :], np.arange(h, dtype=np.int32)[:, None]
        )
        colour_of = np.where(veg_wall, h + w, colour_of)
        colour_of = np.where(
            ground, np.where(road, h + w + 1, np.where(curb, h + w + 3, h + w + 2)), colour_of
        )
        # Sky: drifting clouds; facades: texture and a window grid; vegetation blocks: leaves.
        cloud_x = ((np.arange(w)[None, :] - vx) * 0.5 + index * 0.2).astype(np.int64) & 255
        clouds = np.maximum(_lookup(self.tex, np.arange(h)[:, None] // 2, cloud_x), 0) * np.float32(
            self.cloudiness
        )
        hw_ = np.where(wall, height_on_wall, np.float32(0))
        wall_tex = _lookup(self.tex, (hw_ * 9).astype(np.int32), (u_wall * 9).astype(np.int32))
        leaves = _lookup(self.tex_fine, (hw_ * 20).astype(np.int32), (u_wall * 20).astype(np.int32))
        win_w = (2.0 + 1.5 * _hash01(self.seed, 6, block)).astype(np.float32)
        storey = _frac(hw_ / np.float32(3.2))
        window = (_frac(u_wall / win_w) > 0.3) & (storey > 0.31) & (storey < 0.75) & (hw_ > 3.2) & ~is_veg
        facade_shade = np.where(window, 0.35, 1 + 0.12 * wall_tex)
        facade_shade = np.where(is_veg, 1 + 0.45 * leaves + 0.3 * wall_tex, facade_shade)
        # Ground: asphalt texture and lane marks, paving tiles.
        zg = z_ground + np.float32(travelled)
        near = np.clip(np.float32(25.0) / z_ground, 0.2, 1.0)
        ground_tex = _lookup(self.tex, (zg * 6).astype(np.int32), (x_ground * 6).astype(np.int32))
        centre = ax < 0.08
        if self.dashed:
            centre &= _frac(zg / np.float32(9.0)) < 0.45
        mark = ((ax > self.road_half - 0.35) & (ax < self.road_half - 0.2)) | centre
        tile = (_frac(x_ground / np.float32(0.8)) < 0.06) | (_frac(zg / np.float32(0.8)) < 0.06)
        ground_shade = np.where(
            road, np.where(mark, 1.0, 1 + 0.15 * ground_tex * near), 1 + 0.1 * ground_tex - 0.25 * tile
        )
        shade = np.where(wall, facade_shade, np.where(ground, ground_shade, np.float32(1)))
        bright = np.where(
            wall, np.where(window, 25 * _frac(hw_ / np.float32(1.7)), 0), np.where(ground, 0, clouds)
        )
        bright = np.where(
            road & mark, np.float32(self.marking - self.asphalt) * (1 + 0.05 * ground_tex), bright
        )
        # The shadow of the buildings on one side of the street.
        shadow_edge = self.shadow_side * (max(self.wall_left, self.wall_right) - self.shadow_width)
        in_shadow = (x_ground * self.shadow_side > shadow_edge * self.shadow_side) & ground
        dim = np.where(in_shadow, np.float32(self.shadow_strength), np.float32(1))
        image = table.take(colour_of, axis=0) * (shade * dim)[..., None].astype(np.float32)
        image += (bright * dim)[..., None].astype(np.float32)
        return image, labels

    def _sprites(self, index: int, travelled: float, cam_x: float) -> list[tuple[float, _Draw]]:
        """(depth, drawer) for every object in view."""
        time = index / FPS
        sprites: list[tuple[float, _Draw]] = []
        span = 130.0
        # Poles (some with a traffic sign) and trees: fixed in the world, spaced along both curbs.
        for kind, spacing, salt in (("pole", self.pole_spacing, 10), ("tree", self.tree_spacing, 20)):
            if spacing <= 0:
                continue
            first = math.floor(travelled / spacing)
            for k in range(first, first + int(span / spacing) + 2):
                for side in (-1, 1):
                    key = np.array([k * 2 + (side > 0)])
                    jitter = float(_hash01(self.seed, salt, key)[0])
                    if kind == "tree" and jitter < 0.25:
                        continue
                    z = k * spacing + jitter * spacing * 0.5 - travelled
                    if not NEAR < z < span:
                        continue
                    x = side * (self.road_half + self.curb + 0.3 + 0.4 * jitter) - cam_x
                    if kind == "pole":
                        sprites.append(
                            (z, _PoleDraw(self, x, z, float(_hash01(self.seed, salt + 1, key)[0])))
                        )
                    else:
                        sprites.append(
                            (z, _TreeDraw(self, x, z, float(_hash01(self.seed, salt + 2, key)[0])))
                        )
        for car in self.cars:
            z = (car.z0 + (car.speed - self.cam_speed) * time) % span - 10.0
            if NEAR + car.length / 2 < z < span:
                sprites.append((z, _CarDraw(self, car, car.lane_x - cam_x, z)))
        for person in self.people:
            if person.crossing:
                period = 2 * (self.road_half + 3) / abs(person.speed)
                along = ((time / period + person.phase) % 1.0) * 2 * (self.road_half + 3) - (
                    self.road_half + 3
                )
                x = along - cam_x
                z = (person.z0 - self.cam_speed * time) % 80.0 + 3.0
            else:
                x = person.x - cam_x
                z = (person.z0 + (person.speed - self.cam_speed) * time) % 80.0 + 1.0
            if NEAR + 0.5 < z < 80.0:
                sprites.append((z, _PersonDraw(self, person, x, z, time)))
        return sprites

    def _camera_response(self, image: np.ndarray, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index, 0xF4A])
        if self.blur:
            image = cv2.GaussianBlur(image, (3, 3), 0.8)
        flicker = 1.0 + 0.04 * math.sin(index / FPS * 1.3 + self.seed)
        oy, ox = (int(v) for v in rng.integers(0, 32, 2))
        grain = self.grain[oy : oy + self.height, ox : ox + self.width]
        image = image * (self.tint * np.float32(self.gain * flicker)) + grain
        linear = np.clip(image, 0, 255).astype(np.uint8)
        return cv2.LUT(linear, self.gamma_lut)

    # -- drawing helpers ------------------------------------------------------------------------

    def project(self, x: float, y: float, z: float, vx: float, vy: float) -> tuple[float, float]:
        """Image position of a point ``x`` metres right, ``y`` up, ``z`` ahead of the camera."""
        return vx + x * self.focal / z, vy + (CAMERA_HEIGHT - y) * self.focal / z

    def fill(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        points: list[tuple[float, float]],
        label: int,
        rgb: tuple[float, float, float] | np.ndarray,
    ) -> None:
        """Fill one convex polygon on the frame and the label map with the same pixels."""
        pts = np.round(np.asarray(points, np.float64) * _SCALE).astype(np.int32)
        if np.abs(pts).max() > 1 << 26:
            return
        cv2.fillConvexPoly(image, pts, self._colour(label, rgb), cv2.LINE_8, _SUBPIXEL_BITS)
        cv2.fillConvexPoly(labels, pts, label, cv2.LINE_8, _SUBPIXEL_BITS)

    def ellipse(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        centre: tuple[float, float],
        axes: tuple[float, float],
        label: int,
        rgb: tuple[float, float, float] | np.ndarray,
    ) -> None:
        c = (round(centre[0] * _SCALE), round(centre[1] * _SCALE))
        a = (max(round(axes[0] * _SCALE), 1), max(round(axes[1] * _SCALE), 1))
        if max(abs(c[0]), abs(c[1]), a[0], a[1]) > 1 << 26:
            return
        cv2.ellipse(image, c, a, 0, 0, 360, self._colour(label, rgb), -1, cv2.LINE_8, _SUBPIXEL_BITS)
        cv2.ellipse(labels, c, a, 0, 0, 360, label, -1, cv2.LINE_8, _SUBPIXEL_BITS)

    def box(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        x0: float,
        x1: float,
        y0: float,
        y1: float,
        z: float,
        vx: float,
        vy: float,
        label: int,
        rgb: tuple[float, float, float] | np.ndarray,
    ) -> None:
        """A rectangle facing the camera, ``x0..x1`` by ``y0..y1`` metres at depth ``z``."""
        left, top = self.project(x0, y1, z, vx, vy)
        right, bottom = self.project(x1, y0, z, vx, vy)
        right = max(right, left + 1.0)  # thin things stay at least one pixel wide
        self.fill(image, labels, [(left, top), (right, top), (right, bottom), (left, bottom)], label, rgb)


class _Draw:
    def __call__(self, image: np.ndarray, labels: np.ndarray, vx: float, vy: float) -> None:
        raise NotImplementedError


class _PoleDraw(_Draw):
    def __init__(self, scene: SceneSequence, x: float, z: float, variant: float) -> None:
        self.scene, self.x, self.z, self.variant = scene, x, z, variant

    def __call__(self, image: np.ndarray, labels: np.ndarray, vx: float, vy: float) -> None:
        s, x, z, v = self.scene, self.x, self.z, self.variant
        grey = 80 + 100 * v
        height = 4.0 + 3.5 * v
        radius = 0.12 + 0.06 * v
        s.box(image, labels, x - radius, x + radius, 0.0, height, z, vx, vy, POLE, (grey, grey, grey * 1.05))
        if v < 0.65:  # a traffic sign on this pole: a disc, a triangle or a plate
            colour = [(200, 30, 30), (30, 70, 190), (230, 200, 20), (235, 235, 235)][int(v * 6.2) % 4]
            cx, cy = s.project(x - (radius + 0.05) * (1 if x > 0 else -1), 2.6 + v, z, vx, vy)
            size = 0.35 * s.focal / z
            shape = int(v * 17) % 3
            if shape == 0:
                s.ellipse(image, labels, (cx, cy), (size, size), TRAFFIC_SIGN, colour)
                s.ellipse(image, labels, (cx, cy), (size * 0.7, size * 0.7), TRAFFIC_SIGN, (240, 240, 240))
            elif shape == 1:
                pts = [(cx, cy - size), (cx + size, cy + size * 0.8), (cx - size, cy + size * 0.8)]
                s.fill(image, labels, pts, TRAFFIC_SIGN, colour)
            else:
                pts = [
                    (cx - size, cy - size * 0.7),
                    (cx + size, cy - size * 0.7),
                    (cx + size, cy + size * 0.7),
                ]
                pts.append((cx - size, cy + size * 0.7))
                s.fill(image, labels, pts, TRAFFIC_SIGN, colour)
        if v > 0.8:  # a street lamp arm over the road
            tip = x - 1.5 * (1 if x > 0 else -1)
            s.box(
                image, labels, min(x, tip), max(x, tip), height - 0.15, height, z, vx, vy, POLE, (grey,) * 3
            )


class _TreeDraw(_Draw):
    def __init__(self, scene: SceneSequence, x: float, z: float, variant: float) -> None:
        self.scene, self.x, self.z, self.variant = scene, x, z, variant

    def __call__(self, image: np.ndarray, labels: np.ndarray, vx: float, vy: float) -> None:
        s, x, z, v = self.scene, self.x, self.z, self.variant
        trunk_h = 2.0 + 1.5 * v
        s.box(image, labels, x - 0.15, x + 0.15, 0.0, trunk_h + 0.5, z, vx, vy, VEGETATION, (80, 60, 40))
        crown = 1.4 + 1.6 * v
        cx, cy = s.project(x, trunk_h + crown * 0.8, z, vx, vy)
        scale = s.focal / z
        green = (40 + 40 * v, 80 + 60 * v, 25 + 20 * v)
        s.ellipse(image, labels, (cx, cy), (crown * scale, crown * 0.9 * scale), VEGETATION, green)
        darker = (green[0] * 0.7, green[1] * 0.75, green[2] * 0.7)
        s.ellipse(
            image,
            labels,
            (cx - crown * 0.3 * scale, cy + crown * 0.2 * scale),
            (crown * 0.6 * scale,) * 2,
            VEGETATION,
            darker,
        )


class _CarDraw(_Draw):
    def __init__(self, scene: SceneSequence, car: Car, x: float, z: float) -> None:
        self.scene, self.car, self.x, self.z = scene, car, x, z

    def __call__(self, image: np.ndarray, labels: np.ndarray, vx: float, vy: float) -> None:
        s, c, x = self.scene, self.car, self.x
        zb, zf = self.z - c.length / 2, self.z + c.length / 2  # back and front faces
        hw = c.width / 2
        body_top = c.height * 0.55
        color = np.asarray(c.color, np.float32)
        dark = color * 0.6
        # Side face towards the camera's axis (visible when the car is off-centre), then the back.
        side_x = x - hw if x > 0 else x + hw
        pts = [s.project(side_x, 0.2, zb, vx, vy), s.project(side_x, 0.2, zf, vx, vy)]
        pts += [s.project(side_x, body_top, zf, vx, vy), s.project(side_x, body_top, zb, vx, vy)]
        s.fill(image, labels, pts, CAR, dark)
        roof = [s.project(side_x * 0.9 + x * 0.1, body_top, zb + 0.8, vx, vy)]
        roof += [s.project(side_x * 0.9 + x * 0.1, body_top, zf - 1.0, vx, vy)]
        roof += [s.project(side_x * 0.85 + x * 0.15, c.height, zf - 1.6, vx, vy)]
        roof += [s.project(side_x * 0.85 + x * 0.15, c.height, zb + 1.2, vx, vy)]
        s.fill(image, labels, roof, CAR, (40, 50, 60))
        # Wheels under the side and the back.
        for wz in (zb + 0.8, zf - 0.8):
            wx, wy = s.project(side_x, 0.33, wz, vx, vy)
            r = 0.33 * s.focal / wz
            s.ellipse(image, labels, (wx, wy), (r * 0.45, r), CAR, (20, 20, 22))
        s.box(image, labels, x - hw + 0.1, x - hw + 0.35, 0.0, 0.35, zb, vx, vy, CAR, (20, 20, 22))
        s.box(image, labels, x + hw - 0.35, x + hw - 0.1, 0.0, 0.35, zb, vx, vy, CAR, (20, 20, 22))
        s.box(image, labels, x - hw, x + hw, 0.2, body_top, zb, vx, vy, CAR, color)
        cabin = [
            s.project(x - hw * 0.92, body_top, zb + 0.4, vx, vy),
            s.project(x + hw * 0.92, body_top, zb + 0.4, vx, vy),
        ]
        cabin += [
            s.project(x + hw * 0.8, c.height, zb + 1.0, vx, vy),
            s.project(x - hw * 0.8, c.height, zb + 1.0, vx, vy),
        ]
        s.fill(image, labels, cabin, CAR, color * 0.9)
        window = [s.project(x - hw * 0.8, body_top + 0.07, zb + 0.45, vx, vy)]
        window += [s.project(x + hw * 0.8, body_top + 0.07, zb + 0.45, vx, vy)]
        window += [s.project(x + hw * 0.7, c.height - 0.08, zb + 0.95, vx, vy)]
        window += [s.project(x - hw * 0.7, c.height - 0.08, zb + 0.95, vx, vy)]
        s.fill(image, labels, window, CAR, (35, 45, 55))
        for lx in (x - hw + 0.05, x + hw - 0.3):
            s.box(
                image, labels, lx, lx + 0.25, body_top - 0.3, body_top - 0.1, zb, vx, vy, CAR, (200, 20, 20)
            )
        s.box(image, labels, x - 0.3, x + 0.3, 0.35, 0.5, zb, vx, vy, CAR, (225, 225, 210))


class _PersonDraw(_Draw):
    def __init__(self, scene: SceneSequence, person: Person, x: float, z: float, time: float) -> None:
        self.scene, self.person, self.x, self.z, self.time = scene, person, x, z, time

    def __call__(self, image: np.ndarray, labels: np.ndarray, vx: float, vy: float) -> None:
        s, p, x, z = self.scene, self.person, self.x, self.z
        h = p.height
        swing = 0.18 * math.sin(self.time * 2 * math.pi * abs(p.speed) / 1.4 + p.phase)
        trousers = np.asarray(p.trousers, np.float32)
        for sign in (-1.0, 1.0):  # legs as slanted quads
            hip = s.project(x + sign * 0.08, h * 0.5, z, vx, vy)
            foot = s.project(x + sign * 0.08 + sign * swing, 0.0, z, vx, vy)
            lw = 0.07 * s.focal / z
            s.fill(
                image,
                labels,
                [
                    (hip[0] - lw, hip[1]),
                    (hip[0] + lw, hip[1]),
                    (foot[0] + lw, foot[1]),
                    (foot[0] - lw, foot[1]),
                ],
                PERSON,
                trousers * (0.8 if sign < 0 else 1.0),
            )
        s.box(image, labels, x - 0.2, x + 0.2, h * 0.48, h * 0.82, z, vx, vy, PERSON, p.shirt)
        for sign in (-1.0, 1.0):  # arms
            shoulder = s.project(x + sign * 0.2, h * 0.8, z, vx, vy)
            hand = s.project(x + sign * 0.24 - sign * swing * 0.6, h * 0.45, z, vx, vy)
            aw = 0.05 * s.focal / z
            s.fill(
                image,
                labels,
                [
                    (shoulder[0] - aw, shoulder[1]),
                    (shoulder[0] + aw, shoulder[1]),
                    (hand[0] + aw, hand[1]),
                    (hand[0] - aw, hand[1]),
                ],
                PERSON,
                p.shirt,
            )
        hx, hy = s.project(x, h * 0.91, z, vx, vy)
        r = 0.11 * s.focal / z
        s.ellipse(image, labels, (hx, hy), (r, r * 1.15), PERSON, p.skin)
        s.ellipse(image, labels, (hx, hy - r * 0.5), (r, r * 0.6), PERSON, (40, 30, 20))
