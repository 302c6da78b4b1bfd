"""The checkpoint-free ``stain-texture`` descriptor, registered in :mod:`workbench.features.encoders`.

stain-texture: H&E stain colour and grey-level texture of each tile; no learned weights. Input
(n, h, w, 3) uint8 RGB (112 px by default: a 224-px tile at 0.5 mpp seen at 1 µm/px). Blocks, each a
histogram normalised to sum 1 and square-rooted (Hellinger: every block has unit L2 norm, so no
block dominates distances):

- colour, on every second pixel, looked up per RGB cell (5 bits per channel): colour deconvolution
  to H, E, DAB optical density (Ruifrok & Johnston, as ``skimage.color.rgb2hed``) — one histogram per
  stain (12 bins) and a joint H×E histogram (6×6); hue weighted by HSV saturation (12 bins: pen ink
  is blue/green/black, far from H&E's purple and pink); saturation (6 bins);
- texture at 2 scales (full and half resolution): rotation-invariant uniform LBP (8 neighbours,
  radius 1: 10 classes), Sobel gradient magnitude on log-spaced bins (8) and gradient orientation
  weighted by magnitude (8 bins);
- 11 statistics: mean and std of H, E, D (over their ranges); mean and 4×std of grey (half
  resolution); mean saturation; fractions of near-white (background) and of dark pixels.

153 dims, deterministic, numpy + OpenCV (≈ 0.5–1k tiles/s on one core).

The weights digest of the encoder is the sha256 of :meth:`StainTexture.definition` (version, block sizes,
stain ranges, gradient bin edges, colour bits), so it changes only when the definition does.
"""

from __future__ import annotations

import numpy as np

_CLASSES: dict = {}
STAIN_RANGES = (0.3, 0.12, 0.2)  # H, E, DAB optical density ranges (rgb2hed scale)
STAIN_TEXTURE_VERSION = "stain-texture/v1"
_BLOCKS = (12, 12, 12, 36, 12, 6, 10, 8, 8, 10, 8, 8)
_N_STATS = 11
_MAG_EDGES = (2, 4, 8, 16, 32, 64, 128)  # on the L1 Sobel magnitude / 4, grey levels
_LUTS: dict = {}


def _luts() -> dict:
    """Look-up tables of the descriptor, built once: per RGB cell (32³) and for LBP / gradient codes."""
    if _LUTS:
        return _LUTS
    from skimage.color import hed_from_rgb

    level = (np.arange(32) * 8 + 4) / 255.0
    rgb = np.stack(np.meshgrid(level, level, level, indexing="ij"), -1).reshape(-1, 3)
    od = np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)
    hed = np.maximum(od @ hed_from_rgb, 0.0)

    def bins(v, hi, n):
        return np.clip((v * n / hi).astype(np.int64), 0, n - 1).astype(np.uint8)

    cmax, cmin = rgb.max(1), rgb.min(1)
    chroma = cmax - cmin
    sat = chroma / np.maximum(cmax, 1e-6)
    safe, top = np.maximum(chroma, 1e-6), rgb.argmax(1)
    r, g, b = rgb.T
    hue = np.where(top == 0, ((g - b) / safe) % 6, np.where(top == 1, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    lbp = np.empty(256, np.uint8)
    for code in range(256):
        bits = [(code >> k) & 1 for k in range(8)]
        uniform = sum(bits[k] != bits[(k + 1) % 8] for k in range(8)) <= 2
        lbp[code] = sum(bits) if uniform else 9
    gq = np.arange(-32, 32)
    gx, gy = np.meshgrid(gq, gq, indexing="ij")
    _LUTS.update(
        stain=[bins(hed[:, c], STAIN_RANGES[c], 12) for c in range(3)],
        joint=bins(hed[:, 0], STAIN_RANGES[0], 6) * 6 + bins(hed[:, 1], STAIN_RANGES[1], 6),
        hue=bins(hue, 1.0, 12),
        sat_bin=bins(sat, 1.0, 6),
        sat=sat.astype(np.float32),
        hed=(hed / np.array(STAIN_RANGES)).astype(np.float32),
        white=((grey > 0.85) & (sat < 0.15)).astype(np.float32),
        lbp=lbp,
        mag=np.searchsorted(np.array(_MAG_EDGES), np.arange(2048), side="right").astype(np.uint8),
        orient=np.clip((np.arctan2(gy, gx) % np.pi) / np.pi * 8, 0, 7).astype(np.uint8).reshape(-1),
    )
    return _LUTS


def _hist(idx: np.ndarray, nb: int, n: int, weights=None) -> np.ndarray:
    """Per-tile histograms of small integer codes: (n, ...) → (n, nb)."""
    idx = idx.reshape(n, -1).astype(np.int64) + (np.arange(n, dtype=np.int64) * nb)[:, None]
    w = None if weights is None else weights.reshape(-1)
    return np.bincount(idx.ravel(), w, minlength=n * nb).reshape(n, nb)


def _texture(g: np.ndarray, luts: dict) -> list:
    n, h, w = g.shape
    c = g[:, 1:-1, 1:-1]
    code, tmp = np.zeros(c.shape, np.uint8), np.empty(c.shape, bool)
    for bit, (dy, dx) in enumerate([(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0)]):
        np.greater_equal(g[:, dy : dy + h - 2, dx : dx + w - 2], c, out=tmp)
        code |= tmp.view(np.uint8) << bit
    g16 = g.astype(np.int16)
    dx_ = g16[:, :, 2:] - g16[:, :, :-2]
    gx = dx_[:, :-2] + 2 * dx_[:, 1:-1] + dx_[:, 2:]
    dy_ = g16[:, 2:] - g16[:, :-2]
    gy = dy_[:, :, :-2] + 2 * dy_[:, :, 1:-1] + dy_[:, :, 2:]
    mag = np.abs(gx) + np.abs(gy)
    orient = ((gx >> 5) + 32) * 64 + ((gy >> 5) + 32)
    return [
        _hist(luts["lbp"][code], 10, n),
        _hist(luts["mag"][np.minimum(mag >> 2, 2047)], 8, n),
        _hist(luts["orient"][orient], 8, n, mag.astype(np.float32)),
    ]


def stain_texture_features(tiles: np.ndarray) -> np.ndarray:
    """The stain-texture descriptor (see the module docstring) of (n, h, w, 3) uint8 RGB tiles → (n, 153) float32."""
    import cv2

    tiles = np.ascontiguousarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"stain-texture needs (n, h, w, 3) uint8 tiles, got {tiles.shape} {tiles.dtype}")
    n, h, w, _ = tiles.shape
    if n == 0:
        return np.zeros((0, sum(_BLOCKS) + _N_STATS), np.float32)
    luts = _luts()
    c = tiles[:, ::2, ::2]
    q = ((c[..., 0] >> 3).astype(np.uint16) << 10) | ((c[..., 1] >> 3).astype(np.uint16) << 5) | (c[..., 2] >> 3)
    blocks = [_hist(luts["stain"][k][q], 12, n) for k in range(3)]
    blocks += [
        _hist(luts["joint"][q], 36, n),
        _hist(luts["hue"][q], 12, n, luts["sat"][q]),
        _hist(luts["sat_bin"][q], 6, n),
    ]
    grey = cv2.cvtColor(tiles.reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w)
    half = cv2.resize(grey.reshape(n * h, w), (w // 2, n * (h // 2)), interpolation=cv2.INTER_AREA)
    half = half.reshape(n, h // 2, w // 2)
    blocks += _texture(grey, luts) + _texture(half, luts)
    hed = luts["hed"][q].reshape(n, -1, 3)
    gf = half.reshape(n, -1)
    stats = np.concatenate(
        [
            hed.mean(1),
            hed.std(1),
            gf.mean(1, keepdims=True) / 255,
            gf.std(1, keepdims=True) * (4 / 255),
            luts["sat"][q].reshape(n, -1).mean(1, keepdims=True),
            luts["white"][q].reshape(n, -1).mean(1, keepdims=True),
            (gf < 51).mean(1, keepdims=True),
        ],
        axis=1,
    )
    out = [np.sqrt(b / np.maximum(b.sum(1, keepdims=True), 1e-12)) for b in blocks]
    return np.concatenate(out + [stats], axis=1).astype(np.float32)


def stain_texture_module_class():
    """A torch module around :func:`stain_texture_features` (built lazily: importing stays torch-free)."""
    if "StainTexture" in _CLASSES:
        return _CLASSES["StainTexture"]
    import torch
    import torch.nn as nn

    class StainTexture(nn.Module):
        """The hand-crafted stain-texture descriptor as a module: uint8 (n, h, w, 3) → (n, 153) float32."""

        version = STAIN_TEXTURE_VERSION
        num_features = sum(_BLOCKS) + _N_STATS

        def definition(self) -> dict:
            return {
                "version": self.version,
                "blocks": list(_BLOCKS),
                "n_stats": _N_STATS,
                "stain_ranges": list(STAIN_RANGES),
                "mag_edges": list(_MAG_EDGES),
                "colour_bits": 5,
            }

        def forward(self, x):
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            return torch.from_numpy(stain_texture_features(arr)).to(x.device if isinstance(x, torch.Tensor) else "cpu")

    _CLASSES["StainTexture"] = StainTexture
    return StainTexture
