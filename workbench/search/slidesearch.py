"""Slide search after SISH (Chen et al. 2022, mahmoodlab/SISH): mosaics and slide ranking.

:func:`mosaic` summarises a slide by a few tiles, :func:`sish_rank` ranks database slides from the
mosaic tiles' hits by SISH's uncertainty rule, :func:`mean_similarity_rank` is the simple baseline.
:class:`workbench.search.retrieval.StoreIndex` runs the searches (``StoreIndex.mosaic``,
``StoreIndex.query_slide``); this module holds only the rules, on plain arrays and hit lists.

Mosaic rule (:func:`mosaic`, after SISH's ``extract_mosaic.py``)
    1. Drop tiles where ``keep`` is False: near-white tiles (SISH: grey level > 235 on more than 90 % of
       the tile at 5x, see :func:`near_white`).
    2. k-means with ``min(n_colour, n)`` clusters (SISH: 9, scikit-learn ``KMeans(random_state=0)`` with
       10 restarts) on ``cluster_features``: by default SISH's RGB histograms of the tiles at 5x (256 bins
       per channel, :func:`colour_histograms`); embeddings as an option.
    3. Inside each colour cluster of ``n_c`` tiles, k-means on the tile coordinates with
       ``int(rate * n_c)`` clusters (rate 5 %, rounded down as SISH); when that is 0 (``n_c`` < 20) SISH
       keeps every tile of the cluster, and so do we.
    4. SISH's mosaic is the spatial centroids (coordinates truncated to integers), re-read from the slide;
       we keep, for each centroid, the cluster's tile nearest to it, so its embedding exists. Duplicates
       are removed.
    Not reproduced: SISH's pretrained LBP "trash" classifier (a logistic regression on LBP histograms,
    ``checkpoints/trash_lgrlbp.pkl``) that drops debris tiles before step 2.

Label weights (:func:`label_weights`)
    Inverse label frequency over slides, normalised to sum to 10 (``LABEL_WEIGHT_SUM``); missing
    labels are ignored.

SISH ranking rule (:func:`sish_rank`, following SISH's ``eval.py``)
    ``hits[i]`` is mosaic tile i's result list of ``(slide, distance, label)`` sorted by distance,
    best first (it may be empty).

    1. Per mosaic tile: label weight ``+= w(label) / (rank + 1)`` over its list (rank from 0),
       normalised to sum to 1; entropy in bits of these weights (0 = all hits agree).
    2. Clean: when the list lengths take more than 3 distinct values, keep tiles whose length lies
       strictly between the 5th and 95th percentiles; let ``t`` = mean over tiles of their top-5 mean
       distance; sort tiles by entropy and drop those whose top-5 mean distance exceeds ``t``.
    3. Vote: the first 5 tiles sum their normalised label weights; the top label wins (the next one if
       all 5 tiles' own majority labels disagree with it); those of the 5 whose own majority label
       differs from the vote are marked removed.
    4. Walk the tiles in entropy order; a hit enters once per slide if its tile's entropy is 0 or its
       distance <= ``t``; drop entries from removed tiles; sort by (entropy, distance).

Baseline (:func:`mean_similarity_rank`)
    ``hits[i]`` holds ``(slide, similarity, label)``; a slide's score is the mean over mosaic tiles of
    its best similarity among the tile's hits, a slide absent from a tile's hits counting 0 for it;
    best first.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

__all__ = [
    "LABEL_WEIGHT_SUM",
    "colour_histograms",
    "label_weights",
    "mean_similarity_rank",
    "mosaic",
    "near_white",
    "sish_rank",
]

LABEL_WEIGHT_SUM = 10.0  # SISH normalises the inverse label frequencies to sum to 10


# --------------------------------------------------------------------------- mosaics


def near_white(images: np.ndarray, *, grey: int = 235, fraction: float = 0.9) -> np.ndarray:
    """(n,) True for tiles (n, h, w, 3) uint8 whose grey level is > ``grey`` on > ``fraction`` of pixels.

    SISH's white filter: PIL ``convert('L')`` (ITU-R 601 luma, rounded) then ``cv2.threshold(235, THRESH_BINARY)``,
    which marks pixels strictly above 235.
    """
    g = np.rint(images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    return (g > grey).mean(axis=(1, 2)) > fraction


def colour_histograms(images: np.ndarray, *, bins: int = 256) -> np.ndarray:
    """(n, 3 * bins) per-channel RGB histograms of tiles (n, h, w, 3) uint8, each channel summing to 1.

    SISH concatenates ``cv2.calcHist`` counts of the R, G and B channels with 256 bins each; its tiles all
    have the same pixel count, so normalising (done here, for tiles of any size) changes no k-means result.
    """
    n = len(images)
    idx = (images.reshape(n, -1, 3).astype(np.int64) * bins) // 256  # (n, p, 3) bin of each channel
    offs = idx + np.arange(3) * bins + (np.arange(n) * 3 * bins)[:, None, None]
    hist = np.bincount(offs.ravel(), minlength=n * 3 * bins).reshape(n, 3 * bins).astype(np.float32)
    return hist / max(1, idx.shape[1])


def mosaic(
    coords: np.ndarray,
    cluster_features: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    n_colour: int = 9,
    rate: float = 0.05,
    random_state: int = 0,
    n_init: int = 10,
) -> np.ndarray:
    """Indices of a slide's mosaic tiles, following SISH's two-stage k-means (rule in the module docstring).

    Parameters
    ----------
    coords : (n, 2) tile coordinates
    cluster_features : (n, f) what the first k-means clusters (SISH: RGB histograms at 5x; or embeddings)
    keep : (n,) bool, optional – False for tiles to leave out (SISH: near-white tiles)
    n_colour : colour clusters (SISH: 9); rate : spatial clusters per tile of a colour cluster (SISH: 0.05)
    n_init : k-means restarts (SISH ran scikit-learn's default of the time, 10)

    Returns
    -------
    (m,) int64 sorted tile indices into ``coords``
    """
    from sklearn.cluster import KMeans

    coords = np.asarray(coords, dtype=np.float64)
    cand = np.arange(len(coords)) if keep is None else np.flatnonzero(keep)
    if cand.size == 0:
        return np.empty(0, dtype=np.int64)
    feats = np.asarray(cluster_features, dtype=np.float64)[cand]
    k1 = min(n_colour, len(np.unique(feats, axis=0)))
    colour = (
        KMeans(k1, n_init=n_init, random_state=random_state).fit_predict(feats) if k1 > 1 else np.zeros(len(cand), int)
    )
    chosen = []
    for c in range(k1):
        members = cand[colour == c]
        if members.size == 0:
            continue
        k2 = int(rate * len(members))
        if k2 == 0:  # SISH: a cluster of fewer than 1 / rate tiles is kept whole
            chosen.append(members)
            continue
        xy = coords[members]
        k2 = min(k2, len(np.unique(xy, axis=0)))
        centres = (
            KMeans(k2, n_init=n_init, random_state=random_state).fit(xy).cluster_centers_
            if k2 > 1
            else xy.mean(0, keepdims=True)
        )
        d2 = ((xy[None, :, :] - centres[:, None, :]) ** 2).sum(-1)  # (k2, n_c)
        chosen.append(members[d2.argmin(1)])
    return np.unique(np.concatenate(chosen)).astype(np.int64)


# --------------------------------------------------------------------------- slide ranking


def label_weights(slide_labels) -> dict:
    """SISH label weights: inverse label frequency over slides, normalised to sum to 10 (missing labels ignored)."""
    import pandas as pd

    labels = pd.Series(list(slide_labels), dtype=object).dropna()
    counts = labels.value_counts(sort=False)
    values, counts = counts.index.to_numpy(), counts.to_numpy()
    if len(values) == 0:
        return {}
    inv = 1.0 / counts
    return dict(zip(values.tolist(), (LABEL_WEIGHT_SUM * inv / inv.sum()).tolist()))


def sish_rank(hits: list[list[tuple]], weights: dict) -> list[dict]:
    """Rank database slides from the mosaic tiles' hits by SISH's uncertainty rule.

    ``hits[i]`` is mosaic tile i's result list of ``(slide, distance, label)`` sorted by distance,
    best first (it may be empty). The four steps (weights and entropy, clean, vote, walk) are those
    of SISH's ``eval.py``, stated in this module's docstring.

    Returns
    -------
    list of dicts ``{slide, label, entropy, distance, mosaic}``, one per slide, best first
    """
    bags = []  # (tile index, entropy, distances, length)
    label_count = {}
    for i, res in enumerate(hits):
        if not res:
            continue
        lc = defaultdict(float)
        for rank, (_, _, lab) in enumerate(res):
            lc[lab] += weights.get(lab, 0.0) / (rank + 1)
        total = sum(lc.values())
        p = {lab: v / total for lab, v in lc.items()} if total > 0 else {lab: 1.0 / len(lc) for lab in lc}
        ent = max(0.0, float(-sum(v * math.log2(v) for v in p.values() if v > 0)))
        label_count[i] = p
        bags.append((i, ent, [h[1] for h in res], len(res)))
    if not bags:
        return []
    lengths = [b[3] for b in bags]
    if len(set(lengths)) > 3:
        lo, hi = np.percentile(lengths, 5), np.percentile(lengths, 95)
        bags = [b for b in bags if lo < b[3] < hi] or bags
    thr = float(np.mean([np.mean(b[2][:5]) for b in bags]))
    bags = sorted(bags, key=lambda b: b[1])
    bags = [b for b in bags if np.mean(b[2][:5]) <= thr]
    top = bags[:5]
    board = defaultdict(float)
    for b in top:
        for lab, v in label_count[b[0]].items():
            board[lab] += v
    removed: set = set()
    for vote, _ in sorted(board.items(), key=lambda kv: -kv[1]):
        own = {b[0]: max(label_count[b[0]].items(), key=lambda kv: kv[1])[0] for b in top}
        removed = {i for i, lab in own.items() if lab != vote}
        if len(removed) != len(top):
            break
    ranked, seen = [], set()
    for i, ent, _, _ in bags:
        for slide, dist, lab in hits[i]:
            if slide in seen or not (ent == 0 or dist <= thr):
                continue
            seen.add(slide)
            ranked.append({"slide": slide, "label": lab, "entropy": ent, "distance": float(dist), "mosaic": i})
    ranked = [r for r in ranked if r["mosaic"] not in removed]
    return sorted(ranked, key=lambda r: (r["entropy"], r["distance"]))


def mean_similarity_rank(hits: list[list[tuple]]) -> list[dict]:
    """Baseline slide ranking: mean over mosaic tiles of each slide's best similarity among the tile's hits.

    ``hits[i]`` holds ``(slide, similarity, label)``; a slide absent from a tile's hits counts 0 for it.
    Returns dicts ``{slide, label, score}``, best first.
    """
    m = max(1, len(hits))
    best: dict = defaultdict(dict)
    labels = {}
    for i, res in enumerate(hits):
        for slide, sim, lab in res:
            labels[slide] = lab
            best[slide][i] = max(best[slide].get(i, -np.inf), float(sim))
    ranked = [{"slide": s, "label": labels[s], "score": sum(v.values()) / m} for s, v in best.items()]
    return sorted(ranked, key=lambda r: -r["score"])
