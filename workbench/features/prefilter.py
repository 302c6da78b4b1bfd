"""Marker (pen) prefilter: a linear model on tile features, scores into the store (Mussel's method).

The reference run scored every tile with a logistic regression on CTransPath features and flagged
tiles with score ≥ 0.75 ("filter tiles: false": flagged tiles are kept, with the flag). Here any
registered encoder's features can be used. :class:`MarkerPrefilter` is a scikit-learn-style estimator
(standardise, then ``LogisticRegression``); it is saved as plain JSON (coefficients, intercept,
scaler, the encoder and weights digest it expects) — never pickled. :func:`score_store` writes
``slides/<id>/prefilter/<name>`` (n,) float32 scores with attrs threshold, drop, encoder, complete last.

Labels for ``fit`` come from the synthetic ground truth (:func:`truth_labels`: pen fraction ≥ 0.3 →
marker) or from napari QC labels (:func:`qc_training_labels`: 1 = marker, 0 = keep, -1 unlabelled).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from workbench import store as st

log = logging.getLogger(__name__)

FORMAT = "workbench.MarkerPrefilter/1"


class MarkerPrefilter:
    """Logistic regression on standardised features scoring P(marker) per tile.

    Parameters
    ----------
    threshold : score at or above which a tile is flagged (reference run: 0.75)
    C : inverse L2 regularisation strength
    class_weight : ``"balanced"`` (markers are rare) or None
    random_state : seed of the solver
    encoder : name of the encoder whose features the model expects (checked by :func:`score_store`)

    Attributes (after ``fit``): ``coef_`` (d,), ``intercept_`` float, ``mean_`` (d,), ``scale_`` (d,),
    ``n_features_in_``, ``weights_digest_`` (set by the caller or :func:`fit_from_store`).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5)); y = X[:, 0] > 1
    >>> pf = MarkerPrefilter().fit(X, y)
    >>> bool(pf.predict(X)[y].mean() > 0.9)
    True
    """

    def __init__(
        self,
        threshold: float = 0.75,
        C: float = 1.0,
        class_weight="balanced",
        random_state=0,
        encoder: str | None = None,
    ):
        self.threshold, self.C, self.class_weight = threshold, C, class_weight
        self.random_state, self.encoder = random_state, encoder

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        from workbench.validate import check_float

        check_float("threshold", self.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
        check_float("C", self.C, 0.0, lo_open=True)
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y).astype(bool).ravel()
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be (n, d) with n = len(y); got X {X.shape}, y {y.shape}")
        ok = np.isfinite(X).all(1)
        if not ok.all():
            log.warning("MarkerPrefilter.fit: ignoring %d rows with non-finite features", int((~ok).sum()))
            X, y = X[ok], y[ok]
        if y.all() or not y.any():
            raise ValueError(f"fit needs both marker and non-marker tiles; got {int(y.sum())} of {len(y)} markers")
        self.mean_ = X.mean(0)
        self.scale_ = X.std(0)
        self.scale_[self.scale_ == 0] = 1.0
        lr = LogisticRegression(
            C=float(self.C), class_weight=self.class_weight, random_state=self.random_state, max_iter=2000
        )
        lr.fit((X - self.mean_) / self.scale_, y)
        self.coef_ = lr.coef_.ravel().astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        self.n_features_in_ = X.shape[1]
        self.weights_digest_ = getattr(self, "weights_digest_", None)
        return self

    def _check(self, X) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise RuntimeError("this MarkerPrefilter is not fitted: call fit(X, y) or MarkerPrefilter.load(path)")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected (n, {self.n_features_in_}) features, got {X.shape}")
        return X

    def decision_function(self, X) -> np.ndarray:
        X = self._check(X)
        return ((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        """(n,) P(marker); NaN for rows with non-finite features."""
        z = self.decision_function(X)
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))

    def predict(self, X) -> np.ndarray:
        """(n,) bool flags: score ≥ threshold (rows with NaN scores are not flagged)."""
        p = self.predict_proba(X)
        return np.nan_to_num(p, nan=-1.0) >= self.threshold

    def get_params(self, deep=True) -> dict:
        return {
            "threshold": self.threshold,
            "C": self.C,
            "class_weight": self.class_weight,
            "random_state": self.random_state,
            "encoder": self.encoder,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted model as JSON (floats round-trip exactly); no pickle."""
        self._check(np.zeros((1, getattr(self, "n_features_in_", 0))))
        obj = {
            "format": FORMAT,
            "params": self.get_params(),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "n_features_in": self.n_features_in_,
            "weights_digest": self.weights_digest_,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        st.write_json_atomic(path, obj)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MarkerPrefilter:
        obj = json.loads(Path(path).read_text())
        if obj.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved MarkerPrefilter (format {obj.get('format')!r})")
        pf = cls(**obj["params"])
        pf.coef_ = np.asarray(obj["coef"], np.float64)
        pf.intercept_ = float(obj["intercept"])
        pf.mean_ = np.asarray(obj["mean"], np.float64)
        pf.scale_ = np.asarray(obj["scale"], np.float64)
        pf.n_features_in_ = int(obj["n_features_in"])
        pf.weights_digest_ = obj.get("weights_digest")
        return pf


# --------------------------------------------------------------------------- metrics


def marker_metrics(y_true, scores, threshold: float = 0.75) -> dict:
    """marker_auc (ROC), precision and recall at ``threshold``, n_flagged, n_tiles, n_markers."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    flagged = s >= threshold
    tp = int((flagged & y).sum())
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")
    return {
        "marker_auc": auc,
        "precision": float(tp / flagged.sum()) if flagged.any() else float("nan"),
        "recall": float(tp / y.sum()) if y.any() else float("nan"),
        "n_flagged": int(flagged.sum()),
        "n_tiles": int(len(y)),
        "n_markers": int(y.sum()),
    }


# --------------------------------------------------------------------------- labels and store glue


def truth_labels(root, paths: dict | None = None, *, pen_threshold: float = 0.3, ids: list[str] | None = None) -> dict:
    """Per slide (n,) int8 labels from the synthetic ground truth: 1 if pen fraction ≥ ``pen_threshold``.

    ``paths`` maps slide_id → slide file (default: the path the store recorded for the slide).
    """
    from workbench.io.synthetic import load_truth, tile_truth

    out = {}
    for s in st.slide_ids(root) if ids is None else ids:
        g = root[st.Key.slide(s)]
        path = (paths or {}).get(s, g.attrs["path"])
        truth = tile_truth(load_truth(path), g["coords"][:], float(g.attrs["size0"]))
        out[s] = (truth["pen"] >= pen_threshold).astype(np.int8)
    return out


def qc_training_labels(root, ids: list[str] | None = None) -> dict:
    """Per slide (n,) int8 labels from napari QC (1 marker, 0 keep, -1 unlabelled; artefacts → -1)."""
    out = {}
    for s in st.slide_ids(root) if ids is None else ids:
        key = st.Key.qc_labels(s)
        if key in root:
            lab = np.asarray(root[key][:], np.int8)
            out[s] = np.where(lab > 1, -1, lab).astype(np.int8)
    return out


def training_data(root, encoder: str, labels: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features and labels of labelled tiles: X (m, d) float32, y (m,) bool, groups (m,) slide ids."""
    Xs, ys, gs = [], [], []
    for s, lab in labels.items():
        key = st.Key.features(s, encoder)
        if not st.is_complete(root, key):
            raise st.StoreError(f"slide {s!r} has no complete {encoder!r} features: run embed_slides first")
        feats = root[key][:]
        if len(feats) != len(lab):
            raise ValueError(f"slide {s!r}: {len(lab)} labels for {len(feats)} tiles")
        keep = np.asarray(lab) >= 0
        Xs.append(feats[keep].astype(np.float32))
        ys.append(np.asarray(lab)[keep] == 1)
        gs.append(np.full(int(keep.sum()), s, dtype=object))
    if not Xs:
        raise ValueError("no labelled slides")
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(gs)


def score_store(
    store_path: str | os.PathLike,
    prefilter: MarkerPrefilter,
    encoder: str | None = None,
    *,
    name: str = "marker",
    drop: bool = False,
) -> pd.DataFrame:
    """Score every slide with complete ``encoder`` features; write ``prefilter/<name>`` (complete last).

    ``drop=True`` records that later stages should remove flagged tiles; the default keeps them with the
    flag, as the reference run did. Returns one row per slide: slide_id, n_tiles, n_flagged, status.
    """
    from workbench.validate import check_bool, check_float, check_optional, check_str

    check_optional(check_str, "encoder", encoder, max_len=500)
    check_bool("drop", drop)
    check_float("prefilter.threshold", prefilter.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
    encoder = encoder or prefilter.encoder
    if encoder is None:
        raise ValueError("give the encoder whose features the prefilter was fitted on")
    if prefilter.encoder is not None and prefilter.encoder != encoder:
        raise ValueError(f"the prefilter was fitted on {prefilter.encoder!r} features, not {encoder!r}")
    st.check_name(name, "prefilter name")
    root = st.open_store(store_path, mode="a")
    rows = []
    with st.write_lock(store_path):
        for s in st.slide_ids(root):
            key = st.Key.features(s, encoder)
            if not st.is_complete(root, key):
                rows.append({"slide_id": s, "n_tiles": 0, "n_flagged": 0, "status": "no features"})
                log.warning("slide %r: no complete %r features; not scored", s, encoder)
                continue
            feats = root[key]
            digest = feats.attrs.get("weights_digest")
            if prefilter.weights_digest_ and digest != prefilter.weights_digest_:
                raise ValueError(
                    f"slide {s!r}: features made with weights {digest}, the prefilter expects "
                    f"{prefilter.weights_digest_}"
                )
            scores = prefilter.predict_proba(feats[:]).astype(np.float32)
            flagged = int((np.nan_to_num(scores, nan=-1.0) >= prefilter.threshold).sum())
            g = root.require_group(st.Key.prefilters(s))
            arr = st.write_array(
                g,
                name,
                scores,
                attrs={
                    "threshold": float(prefilter.threshold),
                    "drop": bool(drop),
                    "encoder": encoder,
                    "weights_digest": digest,
                    "n_flagged": flagged,
                    "method": "logistic regression on features",
                },
            )
            st.mark_complete(arr)
            rows.append({"slide_id": s, "n_tiles": len(scores), "n_flagged": flagged, "status": "scored"})
    return pd.DataFrame(rows, columns=["slide_id", "n_tiles", "n_flagged", "status"])


def flags(root, slide_id: str, name: str = "marker") -> np.ndarray:
    """(n,) bool flagged tiles of a slide (score ≥ the threshold stored with the scores)."""
    key = st.Key.prefilter(slide_id, name)
    if not st.is_complete(root, key):
        raise st.StoreError(f"slide {slide_id!r} has no complete prefilter {name!r}: run score_store first")
    arr = root[key]
    return np.nan_to_num(arr[:], nan=-1.0) >= float(arr.attrs["threshold"])


def fit_from_store(root, encoder: str, labels: dict, **params) -> MarkerPrefilter:
    """Fit a :class:`MarkerPrefilter` on the labelled tiles of ``labels`` (slide_id → (n,) int8)."""
    X, y, _ = training_data(root, encoder, labels)
    pf = MarkerPrefilter(encoder=encoder, **params)
    first = next(iter(labels))
    pf.weights_digest_ = root[st.Key.features(first, encoder)].attrs.get("weights_digest")
    return pf.fit(X, y)


def split_by_slide(labels: dict, *, test_fraction: float = 0.5, random_state=0) -> tuple[dict, dict]:
    """Train / held-out label dicts split by slide, stratified on whether a slide has marker tiles."""
    rng = np.random.default_rng(random_state)
    train, test = {}, {}
    for has_marker in (True, False):
        group = [s for s, lab in labels.items() if bool((np.asarray(lab) == 1).any()) == has_marker]
        group = [group[i] for i in rng.permutation(len(group))]
        n_test = int(round(len(group) * test_fraction))
        if len(group) >= 2:
            n_test = min(max(n_test, 1), len(group) - 1)
        for i, s in enumerate(group):
            (test if i < n_test else train)[s] = labels[s]
    return train, test


def score_table(root, name: str = "marker", labels: dict | None = None) -> pd.DataFrame:
    """All tiles' scores: slide_id, tile, x, y, score, flagged (+ label when ``labels`` is given)."""
    frames = []
    for s in st.slide_ids(root):
        key = st.Key.prefilter(s, name)
        if not st.is_complete(root, key):
            continue
        arr = root[key]
        coords = root[st.Key.coords(s)][:]
        df = pd.DataFrame(
            {"slide_id": s, "tile": np.arange(len(coords)), "x": coords[:, 0], "y": coords[:, 1], "score": arr[:]}
        )
        df["flagged"] = np.nan_to_num(df.score.to_numpy(), nan=-1.0) >= float(arr.attrs["threshold"])
        if labels is not None and s in labels:
            df["label"] = np.asarray(labels[s])
        frames.append(df)
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["slide_id", "tile", "x", "y", "score", "flagged"])
    )


def threshold_sweep(y_true, scores, thresholds=None) -> pd.DataFrame:
    """Precision, recall and n_flagged at each threshold (for the notebook's slider and table)."""
    thresholds = np.round(np.arange(0.05, 1.0, 0.05), 2) if thresholds is None else thresholds
    rows = [
        {
            "threshold": float(t),
            **{k: v for k, v in marker_metrics(y_true, scores, t).items() if k in ("precision", "recall", "n_flagged")},
        }
        for t in thresholds
    ]
    return pd.DataFrame(rows)


def tile_images(root, table: pd.DataFrame, *, tile_px: int = 128) -> np.ndarray:
    """RGB images (n, tile_px, tile_px, 3) of the tiles listed in ``table`` (columns slide_id, tile)."""
    from workbench.io.slides import TileReader, open_slide

    out = np.zeros((len(table), tile_px, tile_px, 3), np.uint8)
    for s, rows in table.groupby("slide_id", sort=False):
        g = root[st.Key.slide(s)]
        st.check_slide_file(root, s)  # never read pixels of another file at these coordinates
        coords = g["coords"][:][rows["tile"].to_numpy()]
        px_mpp = float(g.attrs["tile_mpp"]) * int(g.attrs["tile_px"]) / tile_px
        with (
            open_slide(g.attrs["path"], slide_id=s, mpp=g.attrs.get("mpp")) as slide,
            TileReader(slide, tile_px=tile_px, tile_mpp=px_mpp) as reader,
        ):
            out[[table.index.get_loc(i) for i in rows.index]] = reader.read(coords)
    return out
