"""Synthetic H&E-like whole-slide images with ground truth, for tests and the demo.

:func:`make_slide` writes a pyramidal, 256-px tiled, JPEG-compressed TIFF (levels as separate IFDs, 4× apart,
the mpp in the resolution tags: openslide's generic-TIFF reader and tifffile both open it) and, next to it,
``<stem>.truth.npz`` with the ground truth at ``TRUTH_DOWNSAMPLE`` (16) of level 0:

``tissue`` (bool), ``classes`` (uint8, ids index :data:`CLASS_NAMES`, 0 = background), ``pen`` (bool),
``blur`` (bool, out-of-focus regions), ``downsample``, ``mpp``.

How a slide is made, all from one seed:

1. Layout at the truth resolution (slides over ~32k px a side: on a grid 2–8× coarser, ≤ ``_COARSE_MAX`` px a
   side, upsampled bilinearly to the truth grid): tissue pieces are noisy ellipses with holes (the tissue mask
   is a smooth field > 0, so edges stay smooth at full resolution); class regions are thresholded smooth
   noise, the dominant class keeps ~65 % of the tissue, stroma and one or two other classes share the rest;
   pen strokes are thick smooth curves and arcs drawn with antialiasing; blur regions are soft ellipses.
2. Level 0 is rendered in 512-px blocks in optical density (Beer–Lambert, per-slide jittered haematoxylin and
   eosin vectors): per class a haematoxylin and an eosin concentration map (nuclei drawn as polygons, made
   per block from the slide's seed and the block, so nothing repeats; fibres, fat membranes and chromatin
   noise from small periodic textures), blended across class borders, scaled by a smooth stain-strength
   field, over a light-grey background; pen ink adds its own optical density. Blur regions are
   Gaussian-blurred per block over a margin of its neighbours (4σ: the same pixels as blurring the whole
   level, no seams).
3. Lower levels are ``cv2.INTER_AREA`` reductions by 4 (4×4 box means of the top-left 4·⌊h/4⌋ × 4·⌊w/4⌋)
   until the longer side is ≤ 1024 px.

Streaming: level 0 goes into the TIFF tile by tile (tifffile's tile iterator), a 512-row band at a time,
the blocks of a band rendered on 2 threads; each lower level is reduced from the rows of the level above as
they pass and waits, in memory up to 64 MB and otherwise in a raw file beside the slide (deleted afterwards),
for its IFD's turn. No level is ever whole in memory: what is held is ~2 bands (1.5 kB per column each),
~2 bytes per truth pixel (class map, tissue), the pen strokes' bounding boxes and a few block rows of nuclei.

Measured (2-core machine shared with other jobs; ``make_slide`` peak RSS in its own process):

==========  ===========  ========  ============  ===============
side (px)   level-0 RGB  peak RSS  time          file (JPEG q90)
==========  ===========  ========  ============  ===============
8,192       201 MB       0.28 GB   5 s           12 MB
40,000      4.8 GB       0.64 GB   60–107 s      312 MB
150,000     67.5 GB      1.31 GB   18–21.5 min   4.4 GB
==========  ===========  ========  ============  ===============

(lymphocyte-dominant slides with pen and blur, the densest nuclei; ``python benchmarks/synthetic_big.py``,
``benchmarks/results/synthetic_big.json``.) Before streaming the level-0 image was held whole (1.3 GB peak
at 16384², 14 GB at 65k²); the 8192² slide took the same time then (5.1 s in the same session).
:func:`make_demo_set` writes slides in 2 processes (one render thread each).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CLASS_NAMES = ["background", "tumour", "stroma", "fat", "lymphocytes", "necrosis"]
TRUTH_DOWNSAMPLE = 16
DEMO_DIAGNOSES = ("tumour", "lymphocytes", "fat", "necrosis")  # stroma is in every slide as the second class
DEMO_SITES = ("breast", "lung", "colon")
PEN_COLOURS = {"blue": (0.22, 0.42, 0.85), "green": (0.20, 0.58, 0.36), "black": (0.13, 0.13, 0.16)}  # transmission

_BLOCK = 512  # rendering block (multiple of TRUTH_DOWNSAMPLE)
_COARSE_MAX = 2048  # longest side of the layout grid; bigger slides lay out on a grid 2, 4, … times coarser
_SPILL_BYTES = 64 << 20  # reduced pyramid levels bigger than this wait in a raw file, not in memory
_H = np.array([0.65, 0.70, 0.29])  # haematoxylin OD direction (Ruifrok & Johnston)
_E = np.array([0.09, 0.85, 0.30])  # eosin OD direction (a little bluer than Ruifrok's, pinker RGB)
_TUMOUR, _STROMA, _FAT, _LYMPH, _NECROSIS = 1, 2, 3, 4, 5


# --------------------------------------------------------------------------- noise and textures


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """(h, w) float32 noise with correlation length ~``scale`` px, zero mean, unit std."""
    h, w = shape
    step = max(scale / 2.0, 1.0)
    gh, gw = int(np.ceil(h / step)) + 4, int(np.ceil(w / step)) + 4
    g = cv2.GaussianBlur(rng.standard_normal((gh, gw)).astype(np.float32), (0, 0), 1.0)
    up = cv2.resize(g, (int(gw * step), int(gh * step)), interpolation=cv2.INTER_CUBIC)
    oy, ox = int(2 * step), int(2 * step)
    out = up[oy : oy + h, ox : ox + w]
    return ((out - out.mean()) / (out.std() + 1e-6)).astype(np.float32)


def _periodic_noise(
    rng: np.random.Generator, period: int, sigma: float, angle: float | None = None, ratio: float = 1.0
) -> np.ndarray:
    """(period, period) float32 periodic Gaussian-filtered noise, unit std; with ``angle`` (rad), streaks
    along that direction, ``ratio`` times longer than wide. Smooth isotropic fields are made on a coarser
    periodic grid and upsampled (cheaper, still periodic)."""
    if angle is None and sigma >= 8 and period % 8 == 0:
        f = 4
        small = _periodic_noise(rng, period // f, sigma / f)
        wrapped = np.pad(small, 1, mode="wrap")
        up = cv2.resize(wrapped, (wrapped.shape[1] * f, wrapped.shape[0] * f), interpolation=cv2.INTER_CUBIC)
        out = up[f : f + period, f : f + period]
        return out / (out.std() + 1e-6)
    f = np.fft.fftfreq(period).astype(np.float32)
    fy, fx = f[:, None], np.fft.rfftfreq(period).astype(np.float32)[None, :]
    if angle is None:
        g = np.exp(-2 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    else:
        ua = fx * np.cos(angle) + fy * np.sin(angle)  # frequency along the streaks: low
        uc = -fx * np.sin(angle) + fy * np.cos(angle)
        g = np.exp(-2 * np.pi**2 * ((sigma * ratio * ua) ** 2 + (sigma * uc) ** 2))
    spec = np.fft.rfft2(rng.standard_normal((period, period)).astype(np.float32)) * g
    spec[0, 0] = 0
    out = np.fft.irfft2(spec, s=(period, period)).astype(np.float32)
    return out / (out.std() + 1e-6)


def _fat_membranes(rng: np.random.Generator, period: int, cell_px: float) -> np.ndarray:
    """(period, period) float32 periodic map in [0, 1] of adipocyte membranes (a jittered Voronoi tessellation,
    computed at half resolution)."""
    period, cell_px = period // 2, cell_px / 2
    n = max(2, int(round(period / cell_px)))
    gy, gx = np.mgrid[0:n, 0:n]
    pts = (np.stack([gx.ravel(), gy.ravel()], 1) + 0.5 + rng.uniform(-0.38, 0.38, (n * n, 2))) * (period / n)
    m = int(1.2 * cell_px)
    canvas = np.ones((period + 2 * m, period + 2 * m), np.uint8)
    shifts = np.array([(dx, dy) for dx in (-period, 0, period) for dy in (-period, 0, period)])
    allp = (pts[None] + shifts[:, None]).reshape(-1, 2) + m
    allp = allp[(allp >= 0).all(1) & (allp < period + 2 * m - 1).all(1)].astype(np.int32)
    canvas[allp[:, 1], allp[:, 0]] = 0
    _, labels = cv2.distanceTransformWithLabels(canvas, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    seed_of = np.zeros(labels.max() + 1, np.int32)
    seed_of[labels[allp[:, 1], allp[:, 0]]] = np.arange(len(allp))
    lab = seed_of[labels]
    edge = np.zeros(lab.shape, np.uint8)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge = edge[m : m + period, m : m + period] * np.uint8(255)
    edge = cv2.resize(edge, (2 * period, 2 * period), interpolation=cv2.INTER_LINEAR)
    edge = cv2.GaussianBlur(cv2.dilate(edge, np.ones((3, 3), np.uint8)), (0, 0), 1.0)
    return edge.astype(np.float32) / 255.0


class _Nuclei:
    """Nuclei of one class, made block by block on demand (so a slide of any size holds only a few rows of
    them): each rendering block owns the nuclei whose lattice point (or Poisson point) falls in it, drawn from
    a generator seeded by (slide seed, block), and kept where the class's dilated weight > 0.02. A block is
    drawn from the nuclei of its 3×3 neighbourhood (a nucleus reaches less than a block beyond its own)."""

    def __init__(
        self,
        seed: int,
        rend,
        cls: int,
        *,
        spacing: float,
        radius: tuple[float, float],
        elong: tuple[float, float] = (1.0, 1.0),
        irregular: float = 0.05,
        jitter: float = 0.35,
        fibre_angle: bool = False,
        grid: bool = True,
        values=(200, 225, 255),
        n_vertices: int = 12,
    ):
        self.seed, self.rend, self.cls = int(seed), rend, int(cls)
        self.spacing, self.radius, self.elong, self.irregular = float(spacing), radius, elong, float(irregular)
        self.jitter, self.fibre_angle, self.grid = float(jitter), fibre_angle, grid
        self.values = np.asarray(values, np.uint8)
        self.t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)[None, :]
        self.cache: dict = {}

    def evict(self, before_row: int) -> None:
        for key in [k for k in self.cache if k[0] < before_row]:
            del self.cache[key]

    def _own(self, by: int, bx: int):
        """(polys (n, V, 2) int32 at quarter-px, values (n,), centres (n, 2), reach (n,)) of block (by, bx)."""
        key = (by, bx)
        if key in self.cache:
            return self.cache[key]
        rend, s, ds = self.rend, self.spacing, TRUTH_DOWNSAMPLE
        w_all, h_all = rend.size
        y0, x0 = by * _BLOCK, bx * _BLOCK
        out = None
        ly0, lx0 = y0 // ds, x0 // ds
        if 0 <= y0 < h_all and 0 <= x0 < w_all:  # the class near this block at all (blur + dilation + jitter)?
            m = 8
            win = rend.filled[max(0, ly0 - m) : ly0 + _BLOCK // ds + m, max(0, lx0 - m) : lx0 + _BLOCK // ds + m]
            if (win == self.cls).any():
                out = self._make(by, bx, y0, x0, s, ds)
        self.cache[key] = out
        return out

    def _make(self, by, bx, y0, x0, s, ds):
        rng = np.random.default_rng((self.seed, by, bx))
        if self.grid:  # hexagonal lattice over the slide, points whose lattice position is in this block
            j = np.arange(np.ceil(y0 / s), np.ceil((y0 + _BLOCK) / s))
            i = np.arange(np.floor(x0 / s) - 1, np.ceil((x0 + _BLOCK) / s) + 1)
            gx = (i[None, :] + 0.5 * (j[:, None] % 2)) * s
            gy = np.broadcast_to(j[:, None] * s, gx.shape)
            inb = (gx >= x0) & (gx < x0 + _BLOCK)
            c = np.stack([gx[inb], gy[inb]], 1)
            c += rng.uniform(-self.jitter, self.jitter, c.shape) * s
        else:
            c = rng.uniform(0, _BLOCK, (rng.poisson(_BLOCK**2 / s**2), 2)) + [x0, y0]
        if not len(c):
            return None
        rend = self.rend
        hl, wl = rend.filled.shape[0] - 2, rend.filled.shape[1] - 2
        iy = np.clip((c[:, 1] / ds).astype(int), 0, hl - 1)
        ix = np.clip((c[:, 0] / ds).astype(int), 0, wl - 1)
        r0, c0 = iy.min(), ix.min()
        wgt = rend.weight_window(self.cls, r0, iy.max() + 1, c0, ix.max() + 1, dilate=True)
        keep = wgt[iy - r0, ix - c0] > 0.02
        c, iy, ix = c[keep], iy[keep], ix[keep]
        n = len(c)
        if n == 0:
            return None
        radii = rng.uniform(*self.radius, n)
        el = np.sqrt(rng.uniform(*self.elong, n))
        if self.fibre_angle:  # stromal nuclei follow the local fibre direction
            k = rend.k
            mix = rend.fibre_mix_c[np.minimum(iy // k, rend.fibre_mix_c.shape[0] - 1), ix // k]
            ang = np.where(mix > 0.5, rend.fibre_th, rend.fibre_th + rend.fibre_turn) + rng.normal(0, 0.15, n)
        else:
            ang = rng.uniform(0, np.pi, n)
        vals = rng.choice(self.values, n)
        irr = self.irregular
        wobble = 1 + irr * rng.uniform(-1, 1, (n, self.t.shape[1]))
        rx, ry = radii[:, None] * el[:, None] * wobble, radii[:, None] / el[:, None] * wobble
        ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
        px = c[:, :1] + rx * np.cos(self.t) * ca - ry * np.sin(self.t) * sa
        py = c[:, 1:] + rx * np.cos(self.t) * sa + ry * np.sin(self.t) * ca
        polys = (np.stack([px, py], -1) * 4).round().astype(np.int32)  # shift=2: quarter-pixel precision
        reach = radii * np.maximum(el, 1 / el) * (1 + irr) + 2
        return polys, vals, c, reach

    def draw(self, by: int, bx: int, shape: tuple[int, int]) -> np.ndarray | None:
        """(h, w) float32 nuclear density in [0, 1] of block (by, bx), or None when it has no nuclei."""
        h, w = shape
        y0, x0 = by * _BLOCK, bx * _BLOCK
        parts = [self._own(by + dy, bx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        polys = np.concatenate([p[0] for p in parts])
        vals = np.concatenate([p[1] for p in parts])
        c = np.concatenate([p[2] for p in parts])
        reach = np.concatenate([p[3] for p in parts])
        near = (c[:, 0] + reach > x0) & (c[:, 0] - reach < x0 + w) & (c[:, 1] + reach > y0) & (c[:, 1] - reach < y0 + h)
        if not near.any():
            return None
        polys, vals = polys[near], vals[near]
        canvas = np.zeros(shape, np.uint8)
        off = np.array([x0 * 4, y0 * 4], np.int32)
        for v in np.unique(vals):
            cv2.fillPoly(canvas, list(polys[vals == v] - off), int(v), lineType=cv2.LINE_AA, shift=2)
        return canvas.astype(np.float32) * (1 / 255.0)


# --------------------------------------------------------------------------- layout at the truth resolution


def _layout(rng, hl: int, wl: int, px_lr: float, n_pieces: int, dominant: int) -> dict:
    """Low-res (hl, wl) tissue field (> 0 = tissue) and class labels; ``px_lr`` = µm per low-res pixel."""
    yy, xx = np.mgrid[0:hl, 0:wl].astype(np.float32)
    field = np.full((hl, wl), -1.0, np.float32)
    short_side = min(hl, wl)
    cols = int(np.ceil(np.sqrt(n_pieces)))  # pieces on a grid of cells, longer side first
    rows = int(np.ceil(n_pieces / cols))
    if hl > wl:
        rows, cols = cols, rows
    cw, ch = wl / cols, hl / rows
    rough = 0.15 * _smooth_noise(rng, (hl, wl), 0.15 * short_side) + 0.05 * _smooth_noise(
        rng, (hl, wl), 0.03 * short_side
    )
    for p in range(n_pieces):
        r_, c_ = divmod(p, cols)
        cx = (c_ + 0.5 + rng.uniform(-0.08, 0.08)) * cw
        cy = (r_ + 0.5 + rng.uniform(-0.08, 0.08)) * ch
        if r_ == rows - 1 and n_pieces % cols:  # centre an incomplete last row
            cx += (cols - n_pieces % cols) * cw / 2
        a = min(cw, ch) * rng.uniform(0.40, 0.47)
        b = a * rng.uniform(0.65, 0.95)
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        piece = 1 - np.sqrt((u / a) ** 2 + (v / b) ** 2) + rough
        for _ in range(rng.integers(1, 4)):  # holes: irregular gaps inside the piece
            inside = np.argwhere(piece > 0.35)
            if len(inside) == 0:
                break
            hy, hx = inside[rng.integers(len(inside))]
            r = b * rng.uniform(0.07, 0.18)
            e, t = rng.uniform(1.0, 1.8), rng.uniform(0, np.pi)
            hu = (xx - hx) * np.cos(t) + (yy - hy) * np.sin(t)
            hv = -(xx - hx) * np.sin(t) + (yy - hy) * np.cos(t)
            d = np.sqrt((hu / (r * e)) ** 2 + (hv * e / r) ** 2)
            piece = np.minimum(piece, 0.3 * (d - 1) + 0.3 * rough)
        field = np.maximum(field, piece)
    border = np.minimum.reduce([xx, yy, wl - 1 - xx, hl - 1 - yy]) / (0.04 * short_side) - 1
    field = np.minimum(field, 0.2 * border)
    tissue = field > 0

    labels = np.where(tissue, dominant, 0).astype(np.uint8)
    others = [c for c in (_TUMOUR, _FAT, _LYMPH, _NECROSIS) if c != dominant]
    chosen = [_STROMA] if dominant != _STROMA else []
    chosen += list(rng.choice(others, size=int(rng.integers(1, 3)), replace=False))
    fractions = [rng.uniform(0.12, 0.18) if c == _STROMA else rng.uniform(0.07, 0.11) for c in chosen]
    n_tissue = tissue.sum()
    class_noise = []  # (class, noise, threshold): to label a finer grid the same way
    for c, frac in zip(chosen, fractions):
        free = tissue & (labels == dominant)
        if free.sum() == 0:
            break
        noise = _smooth_noise(rng, (hl, wl), 300 / px_lr)
        q = 1 - min(0.95, frac * n_tissue / free.sum())
        thr = np.quantile(noise[free], q)
        labels[free & (noise > thr)] = c
        class_noise.append((int(c), noise, float(thr)))
    return {"field": field, "tissue": tissue, "labels": labels, "class_noise": class_noise}


def _fine_layout(layout: dict, k: int, hl: int, wl: int, dominant: int) -> tuple[np.ndarray, np.ndarray]:
    """Tissue (bool) and class labels (uint8) at the truth resolution (hl, wl) from a layout made on a grid
    ``k`` times coarser: its fields upsampled bilinearly (in row strips, so no full-size float arrays), then
    thresholded as :func:`_layout` does. ``k == 1``: the layout's own arrays."""
    if k == 1:
        return layout["tissue"], layout["labels"]
    tissue = np.empty((hl, wl), bool)
    labels = np.empty((hl, wl), np.uint8)
    field = np.pad(layout["field"], 1, mode="edge")
    noises = [(c, np.pad(n, 1, mode="edge"), thr) for c, n, thr in layout["class_noise"]]
    step = 64 * k
    for r0 in range(0, hl, step):
        r1 = min(hl, r0 + step)
        t = _up(field, r0, r1, 0, wl, k) > 0
        lab = np.where(t, dominant, 0).astype(np.uint8)
        for c, n, thr in noises:
            lab[t & (lab == dominant) & (_up(n, r0, r1, 0, wl, k) > thr)] = c
        tissue[r0:r1], labels[r0:r1] = t, lab
    return tissue, labels


def _pen_strokes(rng, tissue: np.ndarray, px_lr: float, k: int = 1, shape=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """1–3 pen strokes: (soft low-res coverage, uint8 0–255, over the stroke's bounding box only; the box's
    (row, col) offset on the truth grid; ink OD (3,)) each; lines or arcs over tissue. ``tissue`` may be on a
    grid ``k`` times coarser than the truth grid ``shape`` the strokes are drawn on."""
    hl, wl = tissue.shape if shape is None else shape
    pts_in = np.argwhere(tissue) * k + (k - 1) / 2 if k > 1 else np.argwhere(tissue)
    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        colour = list(PEN_COLOURS)[int(rng.integers(len(PEN_COLOURS)))]
        od = -np.log(np.asarray(PEN_COLOURS[colour]))
        cy, cx = pts_in[rng.integers(len(pts_in))] if len(pts_in) else (hl / 2, wl / 2)
        if rng.random() < 0.5:  # an arc around a region, as when circling a finding
            r = rng.uniform(0.1, 0.25) * min(hl, wl)
            t0 = rng.uniform(0, 2 * np.pi)
            t = np.linspace(t0, t0 + rng.uniform(1.2, 1.8) * np.pi, 120)
            rr = r * (1 + 0.08 * np.sin(3 * t + rng.uniform(0, 6)))
            xy = np.stack([cx + rr * np.cos(t) * rng.uniform(0.8, 1.2), cy + rr * np.sin(t)], 1)
        else:  # a smooth curve through the point
            heading = rng.uniform(0, 2 * np.pi)
            turn = np.cumsum(rng.normal(0, 0.03, 120))
            steps = 0.5 * min(hl, wl) / 120
            ang = heading + turn
            xy = np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * steps, 0)
            xy += np.array([cx, cy]) - xy[60]
        width = rng.uniform(50, 90) / px_lr  # ~50–90 µm wide
        m = int(width) + 8  # the stroke's half width and the blur's reach, with room to spare
        oy, ox = max(0, int(np.floor(xy[:, 1].min())) - m), max(0, int(np.floor(xy[:, 0].min())) - m)
        ey, ex = min(hl, int(np.ceil(xy[:, 1].max())) + m), min(wl, int(np.ceil(xy[:, 0].max())) + m)
        if ey <= oy or ex <= ox:  # off the slide
            continue
        canvas = np.zeros((ey - oy, ex - ox), np.uint8)  # only the stroke's bounding box
        cv2.polylines(
            canvas,
            [((xy - [ox, oy]) * 4).round().astype(np.int32)],
            False,
            255,
            thickness=max(1, int(round(width))),
            lineType=cv2.LINE_AA,
            shift=2,
        )
        strokes.append((cv2.GaussianBlur(canvas, (0, 0), 0.7), (oy, ox), od))
    return strokes


def _blur_regions(rng, tissue: np.ndarray, px_lr: float) -> np.ndarray:
    """Low-res soft mask in [0, 1] of 1–2 out-of-focus ellipses centred on tissue."""
    hl, wl = tissue.shape
    yy, xx = np.mgrid[0:hl, 0:wl].astype(np.float32)
    pts_in = np.argwhere(tissue)
    out = np.zeros((hl, wl), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        if not len(pts_in):
            break
        cy, cx = pts_in[rng.integers(len(pts_in))]
        a, b = rng.uniform(150, 350, 2) / px_lr
        d = np.sqrt(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2)
        out = np.maximum(out, np.clip((1.2 - d) / 0.4, 0, 1))
    return out


# --------------------------------------------------------------------------- rendering


def _up(field: np.ndarray, y0: int, y1: int, x0: int, x1: int, ds: int) -> np.ndarray:
    """Bilinear ×ds upsampling of a low-res field over level-0 rows y0:y1, cols x0:x1 (multiples of ds at the
    start), identical to upsampling the whole field then cropping. ``field`` is edge-padded by 1 px; uint8
    fields are coverages in 0–255 (scaled to 0–1)."""
    ly0, lx0 = y0 // ds, x0 // ds
    ly1, lx1 = -(-y1 // ds), -(-x1 // ds)
    win = np.ascontiguousarray(field[ly0 : ly1 + 2, lx0 : lx1 + 2], dtype=np.float32)
    if field.dtype == np.uint8:
        win *= 1 / 255.0
    return _up_win(win, y0, y1, x0, x1, ds)


def _up_win(win: np.ndarray, y0: int, y1: int, x0: int, x1: int, ds: int) -> np.ndarray:
    """:func:`_up` given the field's window (padded rows y0//ds : ceil(y1/ds) + 2, likewise columns)."""
    up = cv2.resize(win, (win.shape[1] * ds, win.shape[0] * ds), interpolation=cv2.INTER_LINEAR)
    return up[ds : ds + y1 - y0, ds : ds + x1 - x0]


def _window(crop: np.ndarray, off: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0:r1, cols c0:c1 of a truth-grid map stored as ``crop`` at offset ``off`` (zero elsewhere)."""
    oy, ox = off
    out = np.zeros((r1 - r0, c1 - c0), crop.dtype)
    a0, a1 = max(r0, oy), min(r1, oy + crop.shape[0])
    b0, b1 = max(c0, ox), min(c1, ox + crop.shape[1])
    if a0 < a1 and b0 < b1:
        out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = crop[a0 - oy : a1 - oy, b0 - ox : b1 - ox]
    return out


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) * (1.0 / (hi - lo)), 0, 1)
    return t * t * (3 - 2 * t)


def _wrap_pad(tex: np.ndarray) -> np.ndarray:
    """A periodic texture padded by one block (wrapping), so any block-sized window is a plain slice."""
    return np.pad(tex, ((0, _BLOCK), (0, _BLOCK)), mode="wrap")


def _warp_periodic(rng, tex: np.ndarray, amplitude: float, scale: float) -> np.ndarray:
    """Domain-warp a periodic texture by a smooth periodic displacement (keeps it periodic)."""
    p = tex.shape[0]
    gy, gx = np.mgrid[0:p, 0:p].astype(np.float32)
    gx += _periodic_noise(rng, p, scale) * amplitude
    gy += _periodic_noise(rng, p, scale) * amplitude
    return cv2.remap(tex, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


class _Renderer:
    """Everything needed to render any level-0 block of one slide, from one seed.

    The layout is drawn on a grid ``k`` times coarser than the truth grid when the slide is big (``k`` a power
    of two so that the coarse grid is ≤ ``_COARSE_MAX`` px a side; 1 up to ~40k px slides): smooth fields
    (tissue field, stain strength, fibre mix, blur regions) stay on that grid and are upsampled per block;
    the class map (``filled``, uint8) and pen coverage (uint8) are held at the truth resolution; nuclei are
    made per block (:class:`_Nuclei`). So memory is ~1 byte per truth pixel per map, not per level-0 pixel.
    """

    def __init__(self, *, width, height, mpp, seed, dominant, n_pieces, pen, blur):
        rng = np.random.default_rng(seed)
        ds = self.ds = TRUTH_DOWNSAMPLE
        hl, wl = self.hl, self.wl = -(-height // ds), -(-width // ds)
        k = 1
        while max(-(-hl // k), -(-wl // k)) > _COARSE_MAX and ds * k * 2 <= _BLOCK:
            k *= 2
        self.k, self.cds = k, ds * k
        hc, wc = -(-hl // k), -(-wl // k)
        px_lr = mpp * ds
        self.dom = dom = CLASS_NAMES.index(dominant)
        self.size = (width, height)
        self.mpp = float(mpp)
        layout = _layout(rng, hc, wc, px_lr * k, n_pieces, dom)
        strokes = _pen_strokes(rng, layout["tissue"], px_lr, k, (hl, wl)) if pen else []
        self.blur = np.pad(_blur_regions(rng, layout["tissue"], px_lr * k), 1, mode="edge") if blur else None
        self.blur_sigma = rng.uniform(3.0, 5.0) * 0.25 / mpp
        self.tissue, labels = _fine_layout(layout, k, hl, wl, dom)
        um = 1.0 / mpp  # level-0 px per µm
        pad = lambda a: np.pad(a.astype(np.float32), 1, mode="edge")  # noqa: E731
        self.field = pad(layout["field"])  # coarse
        filled = labels
        filled[~self.tissue] = dom  # in place: labels are not needed apart from filled (truth: tissue & filled)
        self.filled = np.pad(filled, 1, mode="edge")
        del filled, labels
        present = [c for c in range(1, len(CLASS_NAMES)) if (self.filled == c).any()]
        self.strength = pad(1 + 0.12 * _smooth_noise(rng, (hc, wc), 400 / (mpp * self.cds)))
        self.strokes = [(s, off, od.astype(np.float32)) for s, off, od in strokes]
        # stain: jittered H and E directions and strengths, background optical density
        h = _H + rng.normal(0, 0.03, 3)
        e = _E + rng.normal(0, 0.04, 3)
        h_vec, e_vec = h / np.linalg.norm(h), e / np.linalg.norm(e)
        h_k, e_k = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
        bg_od = rng.uniform(0.025, 0.045) + rng.normal(0, 0.003, 3)
        self.od_matrix = np.array([[h_vec[i] * h_k, e_vec[i] * e_k, 1.0, bg_od[i]] for i in range(3)], np.float32)
        # small periodic textures, each class's only when the class is on the slide
        self.offsets = rng.integers(0, 4096, (8, 2))
        self.fine = [_wrap_pad(_periodic_noise(rng, 512, 1.2)) for _ in range(2)]
        grain = 0.006 * self.fine[1][:_BLOCK, :_BLOCK]
        z = np.zeros_like(grain)
        self.background = cv2.convertScaleAbs(
            cv2.exp(-cv2.transform(cv2.merge([z, z, grain]), self.od_matrix)), alpha=255.0
        )  # (B, B, 3) periodic background RGB
        self.background = np.pad(self.background, ((0, _BLOCK), (0, _BLOCK), (0, 0)), mode="wrap")
        if _NECROSIS in present:
            self.mottle = _wrap_pad(_periodic_noise(rng, 512, 10 * 0.25 / mpp))
        if _STROMA in present:
            th = rng.uniform(0, np.pi)
            turn = rng.uniform(0.6, 1.2)
            self.fibres = []
            for d in (0.0, turn):
                f = _periodic_noise(rng, 1024, 1.0 * um, th + d, ratio=7.0)
                f = _warp_periodic(rng, f, 6 * um, 25 * um)
                self.fibres.append(_wrap_pad(np.tanh(1.3 * f)))
            mix = np.clip(_smooth_noise(rng, (hc, wc), 250 / (mpp * self.cds)) * 0.5 + 0.5, 0, 1)
            self.fibre_mix = pad(mix)
            self.fibre_mix_c, self.fibre_th, self.fibre_turn = mix, th, turn  # stromal nuclei follow the fibres
        if _FAT in present:
            period = 2048 if max(width, height) > 2048 else 1024  # small slides: a smaller tessellation
            self.fat = _wrap_pad(_fat_membranes(rng, period, rng.uniform(55, 75) * um))
        # nuclei, made per block where each class is (each class its own seed)
        seeds = rng.integers(0, 2**62, 6)
        nuc = lambda i, c, **kw: _Nuclei(int(seeds[i]), self, c, **kw)  # noqa: E731
        self.nuclei = {
            _TUMOUR: nuc(
                0,
                _TUMOUR,
                spacing=14 * um,
                radius=(4.8 * um, 7.6 * um),
                elong=(1, 2.4),
                irregular=0.16,
                jitter=0.35,
                values=(170, 200, 230, 255),
            ),
            _STROMA: nuc(
                1,
                _STROMA,
                spacing=40 * um,
                radius=(3.2 * um, 4.5 * um),
                elong=(9, 20),
                irregular=0.05,
                grid=False,
                values=(190, 230),
                fibre_angle=True,
            ),
            _FAT: nuc(
                2,
                _FAT,
                spacing=110 * um,
                radius=(2.5 * um, 3.5 * um),
                elong=(6, 12),
                irregular=0.05,
                grid=False,
                values=(180, 220),
            ),
            _LYMPH: nuc(
                3,
                _LYMPH,
                spacing=7.0 * um,
                radius=(2.6 * um, 3.4 * um),
                irregular=0.07,
                jitter=0.38,
                values=(200, 230, 255),
            ),
            _NECROSIS: nuc(
                4,
                _NECROSIS,
                spacing=7 * um,
                radius=(0.4 * um, 1.5 * um),
                elong=(1, 3),
                irregular=0.35,
                grid=False,
                values=(110, 160, 220),
            ),
        }
        self.ghosts = nuc(
            5,
            _NECROSIS,
            spacing=16 * um,
            radius=(3.5 * um, 5.5 * um),
            grid=False,
            irregular=0.1,
            values=(70, 100),
        )
        self._blocks: dict = {}  # rendered blocks kept for the blur of their neighbours

    def weight_window(self, c: int, r0: int, r1: int, c0: int, c1: int, dilate: bool = False) -> np.ndarray:
        """Class ``c``'s soft weight, ``GaussianBlur(filled == c, σ 0.8)`` over the whole truth grid (and
        3×3-dilated), at truth rows r0:r1, cols c0:c1; indices outside the grid are clamped (edge padding)."""
        hl, wl, m = self.hl, self.wl, 5
        a0, a1 = max(0, min(max(r0, 0), hl - 1) - m), min(hl, max(r1, 1) + m)
        b0, b1 = max(0, min(max(c0, 0), wl - 1) - m), min(wl, max(c1, 1) + m)
        src = (self.filled[1 + a0 : 1 + a1, 1 + b0 : 1 + b1] == c).astype(np.float32)
        w = cv2.GaussianBlur(src, (0, 0), 0.8)
        if dilate:
            w = cv2.dilate(w, np.ones((3, 3)))
        ri = np.clip(np.arange(r0, r1), 0, hl - 1) - a0
        ci = np.clip(np.arange(c0, c1), 0, wl - 1) - b0
        return np.ascontiguousarray(w[np.ix_(ri, ci)])

    def _tex(self, tex: np.ndarray, k: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        p = tex.shape[0] - _BLOCK
        oy, ox = (y0 + self.offsets[k, 0]) % p, (x0 + self.offsets[k, 1]) % p
        return tex[oy : oy + h, ox : ox + w]

    def _class_maps(self, c, by, bx, y0, x0, h, w):
        """Haematoxylin, eosin and grey concentration maps (h, w) float32 of class ``c`` over a block."""
        d = self.nuclei[c].draw(by, bx, (h, w))
        d = np.zeros((h, w), np.float32) if d is None else d
        f1 = self._tex(self.fine[0], 0, y0, x0, h, w)
        f2 = self._tex(self.fine[1], 1, y0, x0, h, w)
        grey = None
        if c == _TUMOUR:
            hh = 0.17 + 0.04 * f2 + d * (1.2 + 0.3 * f1)
            ee = (0.40 + 0.06 * f2) * (1 - 0.6 * d)
        elif c == _STROMA:
            mix = _up(self.fibre_mix, y0, y0 + h, x0, x0 + w, self.cds)
            fib = self._tex(self.fibres[0], 2, y0, x0, h, w) * mix + self._tex(self.fibres[1], 3, y0, x0, h, w) * (
                1 - mix
            )
            ee = np.clip(0.50 + 0.30 * fib + 0.04 * f1, 0.08, None) * (1 - 0.5 * d)
            hh = 0.035 + 0.01 * f2 + d * 1.0
        elif c == _FAT:
            mem = self._tex(self.fat, 4, y0, x0, h, w)
            ee = 0.11 + 0.75 * mem + 0.01 * f1  # faint eosin haze in the vacuoles, pink membranes
            hh = 0.012 + 0.06 * mem + d * 0.9
        elif c == _LYMPH:
            hh = 0.22 + 0.04 * f2 + d * (1.5 + 0.15 * f1)
            ee = 0.15 * (1 - 0.7 * d) + 0.02 * f2
        else:  # necrosis: pale, greyish, mottled, with karyorrhectic debris and ghost nuclei
            mot = self._tex(self.mottle, 5, y0, x0, h, w)
            g = self.ghosts.draw(by, bx, (h, w))
            hh = 0.06 + 0.03 * mot + d * 0.8 + (0 if g is None else 0.2 * g)
            ee = 0.24 + 0.07 * mot + 0.03 * f1
            grey = 0.09 + 0.03 * mot + 0.02 * f2
        return hh, ee, grey

    def block(self, by: int, bx: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of level-0 block (by, bx), before blur."""
        w_all, h_all = self.size
        ds, cds = self.ds, self.cds
        y0, x0 = by * _BLOCK, bx * _BLOCK
        y1, x1 = min(y0 + _BLOCK, h_all), min(x0 + _BLOCK, w_all)
        h, w = y1 - y0, x1 - x0
        ly0, ly1, lx0, lx1 = y0 // ds, -(-y1 // ds) + 2, x0 // ds, -(-x1 // ds) + 2
        f_win = self.field[y0 // cds : -(-y1 // cds) + 2, x0 // cds : -(-x1 // cds) + 2]
        strokes = []
        for crop, off, ink in self.strokes:
            win = _window(crop, off, ly0 - 1, ly1 - 1, lx0 - 1, lx1 - 1)  # padded rows ly0:ly1
            if win.max() > 76:  # coverage > 0.3
                strokes.append((win, ink))
        if f_win.max() <= -0.02 and not strokes:
            p = _BLOCK
            return self.background[y0 % p : y0 % p + h, x0 % p : x0 % p + w]
        hh = np.zeros((h, w), np.float32)
        ee = np.zeros((h, w), np.float32)
        gg = np.zeros((h, w), np.float32)
        if f_win.max() > -0.02:
            present = np.unique(self.filled[ly0:ly1, lx0:lx1])
            for c in present:
                ch, ce, cg = self._class_maps(int(c), by, bx, y0, x0, h, w)
                if len(present) > 1:
                    win = self.weight_window(int(c), ly0 - 1, ly1 - 1, lx0 - 1, lx1 - 1)  # padded rows ly0:ly1
                    wgt = _up_win(win, y0, y1, x0, x1, ds)
                    ch, ce, cg = ch * wgt, ce * wgt, (None if cg is None else cg * wgt)
                hh += ch
                ee += ce
                if cg is not None:
                    gg += cg
            s = _up(self.strength, y0, y1, x0, x1, cds)
            if f_win.min() < 0.02:  # tissue edge in this block
                s *= np.clip(_up(self.field, y0, y1, x0, x1, cds) * 400 + 0.5, 0, 1)
            hh *= s
            ee *= s
            gg *= s
        gg += 0.006 * self.fine[1][y0 % _BLOCK : y0 % _BLOCK + h, x0 % _BLOCK : x0 % _BLOCK + w]  # as self.background
        od = cv2.transform(cv2.merge([hh, ee, gg]), self.od_matrix)
        for s_field, ink in strokes:
            a = _smoothstep(_up_win(s_field.astype(np.float32) * (1 / 255.0), y0, y1, x0, x1, ds), 0.3, 0.7)
            a *= 0.9 + 0.1 * self._tex(self.fine[0], 7, y0, x0, h, w)
            od += a[..., None] * ink
        return cv2.convertScaleAbs(cv2.exp(-od), alpha=255.0)

    def _kept_block(self, by: int, bx: int) -> np.ndarray:
        key = (by, bx)
        if key not in self._blocks:
            self._blocks[key] = self.block(by, bx)
        return self._blocks[key]

    def final_block(self, by: int, bx: int) -> np.ndarray:
        """Block (by, bx) as written: where the blur mask is > 0, blended with a Gaussian blur of the block and
        a margin of its neighbours (4σ, the kernel's reach: the same as blurring the whole level)."""
        if self.blur is None:
            return self.block(by, bx)
        w_all, h_all = self.size
        cds, sigma = self.cds, self.blur_sigma
        m = int(4 * sigma) + 2
        y0, x0 = by * _BLOCK, bx * _BLOCK
        y1, x1 = min(y0 + _BLOCK, h_all), min(x0 + _BLOCK, w_all)
        if self.blur[y0 // cds : -(-y1 // cds) + 2, x0 // cds : -(-x1 // cds) + 2].max() <= 0:
            return self._blocks.get((by, bx)) if (by, bx) in self._blocks else self.block(by, bx)
        a = np.ascontiguousarray(_up(self.blur, y0, y1, x0, x1, cds))
        if a.max() <= 0:
            return self._kept_block(by, bx)
        cy0, cy1, cx0, cx1 = max(0, y0 - m), min(h_all, y1 + m), max(0, x0 - m), min(w_all, x1 + m)
        canvas = np.empty((cy1 - cy0, cx1 - cx0, 3), np.uint8)
        for nby in range(cy0 // _BLOCK, (cy1 - 1) // _BLOCK + 1):
            for nbx in range(cx0 // _BLOCK, (cx1 - 1) // _BLOCK + 1):
                blk = self._kept_block(nby, nbx)
                by0, bx0 = nby * _BLOCK, nbx * _BLOCK
                ry0, ry1 = max(cy0, by0), min(cy1, by0 + blk.shape[0])
                rx0, rx1 = max(cx0, bx0), min(cx1, bx0 + blk.shape[1])
                canvas[ry0 - cy0 : ry1 - cy0, rx0 - cx0 : rx1 - cx0] = blk[ry0 - by0 : ry1 - by0, rx0 - bx0 : rx1 - bx0]
        blurred = cv2.GaussianBlur(canvas, (0, 0), sigma)[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
        return cv2.blendLinear(np.ascontiguousarray(blurred), self._kept_block(by, bx), a, 1 - a)

    def bands(self, workers: int = 1):
        """Level 0 as (≤ 512, width, 3) uint8 row bands, top to bottom (only a few block rows of state kept);
        the blocks of a band rendered on ``workers`` threads (OpenCV and NumPy release the GIL; the pixels do not
        depend on it)."""
        from concurrent.futures import ThreadPoolExecutor

        w_all, h_all = self.size
        nbx = -(-w_all // _BLOCK)
        with ThreadPoolExecutor(max(1, int(workers))) as pool:
            for by in range(-(-h_all // _BLOCK)):
                for key in [key for key in self._blocks if key[0] < by - 1]:
                    del self._blocks[key]
                for n in (*self.nuclei.values(), self.ghosts):
                    n.evict(by - 2)
                band = np.empty((min(_BLOCK, h_all - by * _BLOCK), w_all, 3), np.uint8)

                def one(bx, by=by, band=band):
                    band[:, bx * _BLOCK : (bx + 1) * _BLOCK] = self.final_block(by, bx)

                if workers > 1:
                    list(pool.map(one, range(nbx)))
                else:
                    for bx in range(nbx):
                        one(bx)
                yield band
        self._blocks.clear()

    def truth(self) -> dict:
        """The ground truth at ``TRUTH_DOWNSAMPLE`` (see :func:`make_slide`)."""
        hl, wl, k = self.hl, self.wl, self.k
        pen = np.zeros((hl, wl), bool)
        for crop, (oy, ox), _ in self.strokes:
            pen[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] |= crop > 127  # coverage > 0.5
        if self.blur is None:
            blur = np.zeros((hl, wl), bool)
        elif k == 1:
            blur = self.blur[1:-1, 1:-1] > 0.5
        else:
            blur = np.concatenate(
                [_up(self.blur, r, min(hl, r + 256 * k), 0, wl, k) > 0.5 for r in range(0, hl, 256 * k)]
            )
        return {
            "tissue": self.tissue.copy(),
            "classes": np.where(self.tissue, self.filled[1:-1, 1:-1], 0).astype(np.uint8),
            "pen": pen,
            "blur": blur,
            "downsample": self.ds,
            "mpp": self.mpp,
        }


def _level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Pyramid level shapes: 4× reductions (floor) until the longer side is ≤ 1024."""
    shapes = [(height, width)]
    while max(shapes[-1]) > 1024 and min(shapes[-1]) >= 4:
        h, w = shapes[-1]
        shapes.append((h // 4, w // 4))
    return shapes


class _Level:
    """One reduced pyramid level built from row bands of the level above as they arrive (4×4 box mean,
    ``cv2.INTER_AREA`` by exactly 4 of the top-left 4·h × 4·w), its rows kept in memory when small, else spilled
    to a raw file beside the slide, then read back in bands."""

    def __init__(self, shape: tuple[int, int], spill: Path, in_memory_bytes: int):
        self.h, self.w = shape
        self.rows = 0
        self.pending: np.ndarray | None = None
        self.spill = spill if self.h * self.w * 3 > in_memory_bytes else None
        self.parts: list[np.ndarray] = []
        self.fh = open(spill, "w+b") if self.spill else None  # noqa: SIM115 (closed by close())

    def feed(self, rows: np.ndarray) -> np.ndarray | None:
        """Add rows of the level above; return the new rows of this level (or None)."""
        buf = rows if self.pending is None else np.concatenate([self.pending, rows])
        n = min(len(buf) // 4, self.h - self.rows)
        out = None
        if n > 0:
            out = cv2.resize(buf[: 4 * n, : 4 * self.w], (self.w, n), interpolation=cv2.INTER_AREA)
            if self.fh is not None:
                self.fh.write(out.tobytes())
            else:
                self.parts.append(out)
            self.rows += n
        rest = buf[4 * n :]
        self.pending = rest.copy() if len(rest) and self.rows < self.h else None
        return out

    def bands(self, rows: int):
        if self.fh is None:
            yield from self.parts
            return
        self.fh.flush()
        row_bytes = self.w * 3
        for r0 in range(0, self.rows, rows):
            n = min(rows, self.rows - r0)
            self.fh.seek(r0 * row_bytes)
            buf = bytearray(n * row_bytes)
            self.fh.readinto(buf)
            yield np.frombuffer(buf, np.uint8).reshape(n, self.w, 3)

    def close(self):
        if self.fh is not None:
            self.fh.close()
            self.spill.unlink(missing_ok=True)
            self.fh = None


def _tiles(bands, width: int, tile: int):
    """Row-major (≤ tile, ≤ tile, 3) tiles from row bands of any height (tifffile pads edge tiles)."""
    buf = None
    for band in bands:
        buf = band if buf is None or not len(buf) else np.concatenate([buf, band])
        while len(buf) >= tile:
            row, buf = buf[:tile], buf[tile:]
            for x in range(0, width, tile):
                yield row[:, x : x + tile]
    if buf is not None and len(buf):
        for x in range(0, width, tile):
            yield buf[:, x : x + tile]


def _write_tiff(path: Path, bands, height: int, width: int, mpp: float, tile: int, quality: int) -> int:
    """Pyramidal tiled JPEG TIFF, levels 4× apart as separate IFDs, streamed: level 0 from ``bands`` (an
    iterator of row bands), each lower level reduced from the rows of the one above as they pass (so no level
    is ever whole in memory; levels over 64 MB wait in raw files beside ``path``). Returns the number of levels."""
    import tifffile

    shapes = _level_shapes(height, width)
    levels = [_Level(s, path.with_name(f".{path.name}.L{i + 1}.raw"), _SPILL_BYTES) for i, s in enumerate(shapes[1:])]

    def level0():
        for band in bands:
            rows = band
            for lv in levels:
                rows = lv.feed(rows)
                if rows is None:
                    break
            yield band

    bigtiff = sum(h * w * 3 for h, w in shapes) > 2**31
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
            for i, (h, w) in enumerate(shapes):
                res = 1e4 / (mpp * width / w)  # pixels per centimetre
                src = level0() if i == 0 else levels[i - 1].bands(tile)
                tw.write(
                    data=_tiles(src, w, tile),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": int(quality)},
                    photometric="rgb",
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if i else 0,
                    metadata=None,
                    maxworkers=2,
                    buffersize=16 << 20,
                    software="workbench.io.synthetic",
                )
                if i:
                    levels[i - 1].close()
    finally:
        for lv in levels:
            lv.close()
    return len(shapes)


# --------------------------------------------------------------------------- public API


def truth_path(slide_path) -> Path:
    """``<stem>.truth.npz`` next to the slide."""
    p = Path(slide_path)
    return p.with_suffix(".truth.npz")


def _check(width, height, mpp, dominant, n_pieces, where):
    if dominant not in CLASS_NAMES[1:]:
        raise ValueError(f"{where}: dominant must be one of {CLASS_NAMES[1:]}, got {dominant!r}")
    if width < 256 or height < 256 or not mpp > 0 or n_pieces < 1:
        raise ValueError(
            f"{where}: need width, height >= 256, mpp > 0 and n_pieces >= 1; got width={width}, "
            f"height={height}, mpp={mpp}, n_pieces={n_pieces}"
        )


def render_slide(
    *,
    width: int = 8192,
    height: int = 8192,
    mpp: float = 0.25,
    seed: int = 0,
    dominant: str = "tumour",
    n_pieces: int = 2,
    pen: bool = True,
    blur: bool = True,
) -> tuple[np.ndarray, dict]:
    """Render level 0 of a synthetic slide in memory (what :func:`make_slide` writes); for small slides
    (3 bytes per pixel: use :func:`make_slide` for big ones, it streams).

    Returns
    -------
    image : (height, width, 3) uint8 RGB
    truth : dict as :func:`make_slide` returns
    """
    _check(width, height, mpp, dominant, n_pieces, "render_slide")
    t0 = time.perf_counter()
    rend = _Renderer(
        width=width, height=height, mpp=mpp, seed=seed, dominant=dominant, n_pieces=n_pieces, pen=pen, blur=blur
    )
    t1 = time.perf_counter()
    img = np.empty((height, width, 3), np.uint8)
    y = 0
    for band in rend.bands():
        img[y : y + len(band)] = band
        y += len(band)
    log.debug(
        "rendered %dx%d (seed %d): layout %.2f s, pixels %.2f s", width, height, seed, t1 - t0, time.perf_counter() - t1
    )
    return img, rend.truth()


def make_slide(
    path,
    *,
    width: int = 8192,
    height: int = 8192,
    mpp: float = 0.25,
    seed: int = 0,
    dominant: str = "tumour",
    n_pieces: int = 2,
    pen: bool = True,
    blur: bool = True,
    tile: int = 256,
    quality: int = 90,
    workers: int = 2,
) -> dict:
    """Write a synthetic H&E-like slide (pyramidal JPEG TIFF) and its ground truth; return the truth.

    Streams: level 0 is rendered in 512-px blocks, a row band at a time, straight into the TIFF's tiles, and
    each lower level is reduced from the rows above as they pass, so memory does not grow with level 0
    (see the module docstring for measured figures, e.g. 150,000² px).

    Parameters
    ----------
    path : output ``.tif``/``.tiff`` path; the truth goes to ``<stem>.truth.npz`` beside it
    width, height : level-0 size in pixels
    mpp : level-0 microns per pixel (written to the resolution tags; tissue structures scale with it)
    seed : everything is drawn from this seed (same seed → identical pixels and truth)
    dominant : class name covering most (≥ ~65 %) of the tissue (one of CLASS_NAMES[1:])
    n_pieces : number of tissue pieces
    pen, blur : draw pen-marker strokes / blur some regions
    tile, quality : TIFF tile size (multiple of 16) and JPEG quality
    workers : threads rendering the blocks of a band (JPEG encoding uses 2 more); same pixels for any number

    Returns
    -------
    dict with ``tissue`` (ceil(H/16), ceil(W/16)) bool, ``classes`` same shape uint8 (ids index CLASS_NAMES),
    ``pen`` bool, ``blur`` bool, ``downsample`` (16), ``mpp``.

    Examples
    --------
    >>> truth = make_slide("/tmp/s0.tiff", width=2048, height=2048, dominant="fat", seed=3)  # doctest: +SKIP
    """
    path = Path(path)
    _check(width, height, mpp, dominant, n_pieces, str(path))
    if tile < 16 or tile % 16 or not 1 <= quality <= 100:
        raise ValueError(f"{path}: tile must be a positive multiple of 16 and quality 1–100; got {tile}, {quality}")
    t0 = time.perf_counter()
    rend = _Renderer(
        width=width, height=height, mpp=mpp, seed=seed, dominant=dominant, n_pieces=n_pieces, pen=pen, blur=blur
    )
    t1 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    n_levels = _write_tiff(path, rend.bands(workers), height, width, mpp, tile, quality)
    truth = rend.truth()
    del rend
    from workbench.store import atomic_path

    with atomic_path(truth_path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **truth)
    log.info(
        "%s: %dx%d, %d levels, layout %.2f s, render + write %.2f s",
        path.name,
        width,
        height,
        n_levels,
        t1 - t0,
        time.perf_counter() - t1,
    )
    return truth


def load_truth(slide_path) -> dict:
    """The ground truth saved by :func:`make_slide` next to ``slide_path`` (keys as make_slide returns)."""
    p = truth_path(slide_path)
    if not p.exists():
        alt = Path(str(slide_path) + ".truth.npz")
        if not alt.exists():
            raise FileNotFoundError(f"no ground truth for slide {slide_path}: expected {p}")
        p = alt
    with np.load(p) as z:
        out = {k: z[k] for k in z.files}
    out["downsample"] = int(out["downsample"])
    out["mpp"] = float(out["mpp"])
    return out


def tile_truth(truth: dict, coords, size0: float) -> dict:
    """Ground truth per tile: a truth pixel counts for a tile when its centre lies in the tile's footprint.

    Parameters
    ----------
    truth : from :func:`load_truth` / :func:`make_slide`
    coords : (n, 2) level-0 x, y of each tile's top-left corner
    size0 : tile footprint in level-0 pixels

    Returns
    -------
    dict of (n,) arrays: ``tissue`` and ``pen`` fractions (float32, of the whole footprint; outside the slide
    counts as background), ``cls`` the majority non-background class id (uint8; 0 when the tile has no tissue;
    ties go to the lower id),
    ``purity`` its share of the tile's tissue (float32), and ``class_fraction`` (n, len(CLASS_NAMES)) float32.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    ds = float(truth["downsample"])
    classes = np.asarray(truth["classes"])
    hl, wl = classes.shape
    # truth pixel i is in [x, x + size0) when x <= (i + 0.5) ds < x + size0
    i0 = np.ceil(coords / ds - 0.5).astype(np.int64)
    i1 = np.maximum(np.ceil((coords + size0) / ds - 0.5).astype(np.int64), i0 + 1)
    area = ((i1 - i0).prod(1)).astype(np.float64)
    cx0, cx1 = np.clip(i0[:, 0], 0, wl), np.clip(i1[:, 0], 0, wl)
    cy0, cy1 = np.clip(i0[:, 1], 0, hl), np.clip(i1[:, 1], 0, hl)

    sat_dtype = np.int32 if (hl + 1) * (wl + 1) < 2**31 else np.int64  # 4 bytes per truth pixel when it fits

    def box_sum(mask):
        sat = np.zeros((hl + 1, wl + 1), sat_dtype)
        np.cumsum(np.asarray(mask, bool), 0, dtype=sat_dtype, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], 1, out=sat[1:, 1:])
        return (sat[cy1, cx1] - sat[cy0, cx1] - sat[cy1, cx0] + sat[cy0, cx0]).astype(np.int64)

    counts = np.stack([box_sum(classes == c) for c in range(len(CLASS_NAMES))], 1).astype(np.float64)
    counts[:, 0] = area - counts[:, 1:].sum(1)
    tissue = box_sum(np.asarray(truth["tissue"], bool)) / area
    pen = box_sum(np.asarray(truth["pen"], bool)) / area
    fg = counts[:, 1:]
    cls = np.where(fg.sum(1) > 0, fg.argmax(1) + 1, 0).astype(np.uint8)
    purity = np.where(fg.sum(1) > 0, fg.max(1) / np.maximum(fg.sum(1), 1), 0)
    return {
        "tissue": tissue.astype(np.float32),
        "pen": pen.astype(np.float32),
        "cls": cls,
        "purity": purity.astype(np.float32),
        "class_fraction": (counts / area[:, None]).astype(np.float32),
    }


def _make_slide_job(path, kw):
    make_slide(path, **kw)


def make_demo_set(
    out_dir, *, n_slides: int = 16, size: int = 8192, seed: int = 0, manifest_path=None, workers: int | None = None
) -> pd.DataFrame:
    """Write ``n_slides`` synthetic slides ``demo_000.tiff`` … into ``out_dir``; return their manifest.

    Diagnoses cycle through :data:`DEMO_DIAGNOSES` (balanced; the diagnosis is the slide's dominant class);
    within each diagnosis the first two slides belong to one patient (so some patients have two slides) and
    pen marks alternate (about half the slides have them, independent of the diagnosis). Sites cycle over
    patients through :data:`DEMO_SITES`. Slides are 0.25 mpp; the ``mpp`` column is left empty (it comes from
    the files). The returned table has absolute paths; the CSV written to ``manifest_path`` (if given) has
    paths relative to the manifest's folder (as :func:`workbench.io.manifest.read_manifest` expects).
    Deterministic for a seed (and independent of ``workers``, the number of processes writing slides;
    default: up to 2). Besides the manifest columns the table has ``pen`` (whether the slide has pen marks).
    """
    if n_slides < 1 or size < 256:
        raise ValueError(f"make_demo_set: need n_slides >= 1 and size >= 256, got {n_slides}, {size}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    diagnoses = [DEMO_DIAGNOSES[i % len(DEMO_DIAGNOSES)] for i in range(n_slides)]
    diagnoses = [diagnoses[i] for i in rng.permutation(n_slides)]
    records, jobs, rank, patient_of_pair, n_patients = [], [], {}, {}, 0
    for i, diag in enumerate(diagnoses):
        k = rank[diag] = rank.get(diag, -1) + 1
        if k == 1:
            pid = patient_of_pair[diag]
        else:
            pid = n_patients
            n_patients += 1
            if k == 0:
                patient_of_pair[diag] = pid
        slide_seed = int(seed) * 10_000 + i
        pen = (k % 2 == 0) if (DEMO_DIAGNOSES.index(diag) % 2 == 0) else (k % 2 == 1)
        path = out_dir / f"demo_{i:03d}.tiff"
        jobs.append(
            (
                path,
                dict(
                    width=size,
                    height=size,
                    mpp=0.25,
                    seed=slide_seed,
                    dominant=diag,
                    n_pieces=int(rng.integers(1, 4)),
                    pen=pen,
                    blur=bool(rng.random() < 0.5),
                ),
            )
        )
        records.append(
            {
                "slide_id": path.stem,
                "path": str(path),
                "patient_id": f"patient_{pid:03d}",
                "site": DEMO_SITES[pid % len(DEMO_SITES)],
                "diagnosis": diag,
                "mpp": np.nan,
                "pen": pen,
            }
        )
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    if workers == 1 or len(jobs) == 1:
        for path, kw in jobs:
            make_slide(path, **kw)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork where available: works from scripts without a __main__ guard; the parent holds no slide state
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for fut in [pool.submit(_make_slide_job, path, {**kw, "workers": 1}) for path, kw in jobs]:
                fut.result()
    df = pd.DataFrame.from_records(records)
    if manifest_path is not None:
        manifest_path = Path(manifest_path).resolve()
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        rel = df.copy()
        rel["path"] = [os.path.relpath(p, manifest_path.parent) for p in df["path"]]
        from workbench.store import atomic_path

        with atomic_path(manifest_path) as tmp:
            rel.to_csv(tmp, index=False)
    return df
