"""Retrieval metrics, SISH-style (Chen et al. 2022), and the evaluation loops over a store index.

Definitions (``R`` = the labels of a query's ranked results, best first, possibly fewer than k;
``y`` = the query's label; ``rel_i = [R_i == y]``):

- precision@k = (Σ_{i<=k} rel_i) / k (missing results count as wrong).
- majority vote@k (tiles: ``mv@k``; slides: SISH's ``mMV@k``): the most frequent label among the
  first k results, ties going to the label ranked first, must equal ``y``; when fewer than k
  results exist its count must also be >= ceil(k / 2). No results = wrong.
- mAP@k (as SISH reports it) = mean over queries of Σ_{i<=k, rel_i} precision@i / k. (SISH's code
  divides by 5 whatever k is; we divide by k, so the two agree at k = 5.)

Tables give one row per class, a ``macro`` row (mean over classes, as SISH averages its per-diagnosis
figures), an ``overall`` row (mean over queries) and, for slides, one row per site.

Leave-one-patient-out needs each file under one patient: :func:`check_duplicate_files` refuses
(:class:`~workbench.errors.ManifestError`) a store whose manifest lists the same file (same path, or
same size/header/directory fingerprint) under two exclusion groups, since the query would then find its
own file in the database; ``allow_duplicate_files=True`` runs anyway.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

log = logging.getLogger(__name__)


def encode_labels(query_labels, retrieved_labels):
    """Integer codes of query (nq,) and retrieved (nq, k) labels in one space; None/NaN -> -1.

    Returns (q_codes (nq,), r_codes (nq, k), names (c,)).
    """
    import pandas as pd

    q = np.asarray(query_labels, dtype=object)
    r = np.asarray(retrieved_labels, dtype=object)
    if r.ndim != 2 or r.shape[0] != q.shape[0]:
        raise ValueError(f"retrieved labels must be (nq, k) with nq = {q.shape[0]}, got {r.shape}")
    codes, names = pd.factorize(np.concatenate([q, r.ravel()]), use_na_sentinel=True)
    return codes[: len(q)], codes[len(q) :].reshape(r.shape), np.asarray(names)


def _top(r: np.ndarray, k: int) -> np.ndarray:
    """First k columns of r, padded with -1 to width k."""
    out = np.full((r.shape[0], k), -1, dtype=np.int64)
    kk = min(k, r.shape[1])
    out[:, :kk] = r[:, :kk]
    return out


def precision_at_k(q: np.ndarray, r: np.ndarray, k: int) -> np.ndarray:
    """(nq,) precision@k from integer codes: query (nq,), results (nq, >=0) with -1 for none."""
    rel = (_top(r, k) == q[:, None]) & (q[:, None] >= 0)
    return rel.sum(1) / k


def average_precision_at_k(q: np.ndarray, r: np.ndarray, k: int) -> np.ndarray:
    """(nq,) SISH AP@k: Σ over relevant ranks i <= k of precision@i, divided by k."""
    rel = (_top(r, k) == q[:, None]) & (q[:, None] >= 0)
    prec_i = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
    return (prec_i * rel).sum(1) / k


def majority_vote(r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Majority label of the first k results per row (ties: the label ranked first).

    Returns (label (nq,) with -1 when there are no results, its count (nq,), number of results (nq,)).
    """
    t = _top(r, k)
    valid = t >= 0
    same = (t[:, :, None] == t[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    counts = same.sum(2)  # (nq, k): how often the label at each rank occurs in the top k
    pos = counts.argmax(1)  # first rank among ties = best-ranked label
    rows = np.arange(len(t))
    label = np.where(valid.any(1), t[rows, pos], -1)
    return label, counts[rows, pos], valid.sum(1)


def majority_vote_at_k(q: np.ndarray, r: np.ndarray, k: int) -> np.ndarray:
    """(nq,) bool: majority vote@k correct (count >= ceil(k/2) when fewer than k results)."""
    label, count, n = majority_vote(r, k)
    enough = (n >= k) | (count >= math.ceil(k / 2))
    return (label == q) & (q >= 0) & (n > 0) & enough


def _per_query(q, r, ks, mv_name):
    cols = {}
    for k in ks:
        cols[f"precision@{k}"] = precision_at_k(q, r, k)
        cols[f"{mv_name}@{k}"] = majority_vote_at_k(q, r, k).astype(float)
        cols[f"mAP@{k}"] = average_precision_at_k(q, r, k)
    return cols


def _table(cols: dict, strata: dict):
    """Mean of each per-query column within each stratum (name -> boolean mask)."""
    import pandas as pd

    rows = {}
    for name, mask in strata.items():
        if mask.any():
            rows[name] = {"n_queries": int(mask.sum()), **{c: float(v[mask].mean()) for c, v in cols.items()}}
    return pd.DataFrame.from_dict(rows, orient="index")


def tile_retrieval_metrics(query_labels, retrieved_labels, ks=(1, 5, 10)):
    """Tile retrieval table: precision@k, mv@k, mAP@k per class, ``macro`` and ``overall``.

    Parameters
    ----------
    query_labels : (nq,) labels of the query tiles
    retrieved_labels : (nq, kmax) labels of their results, best first (None where missing)
    """
    q, r, names = encode_labels(query_labels, retrieved_labels)
    cols = _per_query(q, r, ks, "mv")
    per_class = _table(cols, {str(names[c]): q == c for c in range(len(names)) if (q == c).any()})
    return _finish(per_class, cols, q >= 0)


def _finish(per_class, cols, all_mask, extra=None):
    import pandas as pd

    macro = per_class.drop(columns="n_queries").mean().to_frame("macro").T
    macro.insert(0, "n_queries", int(per_class["n_queries"].sum()))
    parts = [per_class.assign(level="class"), macro.assign(level="macro")]
    if extra is not None and len(extra):
        parts.append(extra.assign(level="site"))
    parts.append(_table(cols, {"overall": all_mask}).assign(level="overall"))
    return pd.concat(parts)


def slide_retrieval_metrics(query_labels, retrieved_labels, ks=(1, 5), *, sites=None):
    """Slide retrieval table as SISH reports it: mMV@k and mAP@k (plus precision@k) per class, per site,
    ``macro`` (mean over classes) and ``overall``.

    ``retrieved_labels`` (nq, kmax) are the labels of each query's ranked slides; ``sites`` (nq,) the
    query slides' sites.
    """
    q, r, names = encode_labels(query_labels, retrieved_labels)
    cols = _per_query(q, r, ks, "mMV")
    per_class = _table(cols, {str(names[c]): q == c for c in range(len(names)) if (q == c).any()})
    extra = None
    if sites is not None:
        sites = np.asarray(sites, dtype=object)
        extra = _table(cols, {f"site:{s}": sites == s for s in dict.fromkeys(sites.tolist()) if s is not None})
    return _finish(per_class, cols, q >= 0, extra)


def labels_matrix(results: list, kmax: int) -> np.ndarray:
    """(nq, kmax) object array of labels from per-query ranked label lists, None-padded."""
    out = np.full((len(results), kmax), None, dtype=object)
    for i, labs in enumerate(results):
        labs = list(labs)[:kmax]
        out[i, : len(labs)] = labs
    return out


# --------------------------------------------------------------------------- loops over a store index


def check_duplicate_files(store_index, *, allow: bool = False) -> list[tuple[str, str]]:
    """Pairs of slides of the index's store that are the same file under different exclusion groups.

    Raises :class:`~workbench.errors.ManifestError` naming them (unless ``allow``) when the index excludes
    patients (leave-one-patient-out would be defeated). Returns the pairs.
    """
    import os

    from workbench.errors import ManifestError
    from workbench.io.manifest import duplicate_files, file_fingerprint
    from workbench.store import open_store

    if getattr(store_index, "exclude", None) is None:
        return []
    records = [dict(r) for r in open_store(store_index.store).attrs.get("manifest", [])]
    for r in records:
        if not r.get("file_key") and r.get("path") and os.path.isfile(r["path"]):
            try:
                r["file_key"] = file_fingerprint(r["path"])
            except OSError:
                pass
    group = dict(zip(store_index.slides["slide_id"], store_index.slides["group"]))
    pairs = [(a, b) for a, b in duplicate_files(records) if a in group and b in group and group[a] != group[b]]
    if pairs and not allow:
        text = "; ".join(f"{a!r} ({group[a]}) and {b!r} ({group[b]})" for a, b in pairs[:10])
        raise ManifestError(
            f"store {store_index.store}: the same file is listed under different patients: {text}. "
            "Leave-one-patient-out would find each query in its own database; fix the manifest "
            "(one slide id per file, the right patient_id) or pass allow_duplicate_files=True"
        )
    return pairs


def evaluate_tiles(
    store_index,
    tile_labels: np.ndarray,
    *,
    ks=(1, 5, 10),
    n_queries: int = 1000,
    query_ids: np.ndarray | None = None,
    random_state: int = 0,
    allow_duplicate_files: bool = False,
):
    """Leave-one-patient-out tile retrieval over a :class:`~workbench.search.retrieval.StoreIndex`.

    ``tile_labels`` (N,) gives every tile's label (None/NaN = unlabelled, never a query). Queries are
    ``query_ids`` or ``n_queries`` labelled tiles drawn at random. Returns (table, query_ms), the latter
    the mean wall time per query tile of one batched search.
    """
    from workbench.validate import check_int, check_int_list

    ks = check_int_list("ks", ks, 1, 100_000)
    check_int("n_queries", n_queries, 1)
    check_duplicate_files(store_index, allow=allow_duplicate_files)
    tile_labels = np.asarray(tile_labels, dtype=object)
    if query_ids is None:
        import pandas as pd

        labelled = np.flatnonzero(pd.notna(tile_labels))
        rng = np.random.default_rng(random_state)
        query_ids = np.sort(rng.choice(labelled, size=min(n_queries, labelled.size), replace=False))
    kmax = max(ks)
    t0 = time.perf_counter()
    _, ids = store_index.query_tiles(query_ids, kmax)
    query_ms = 1e3 * (time.perf_counter() - t0) / max(1, len(query_ids))
    got = np.where(ids >= 0, tile_labels[np.maximum(ids, 0)], None)
    return tile_retrieval_metrics(tile_labels[query_ids], got, ks), query_ms


def evaluate_slides(
    store_index,
    *,
    label: str = "diagnosis",
    ks=(1, 5),
    k_tiles: int = 20,
    ranking: str = "sish",
    by: str = "colour",
    white_filter: bool = True,
    max_distance: float | None = None,
    slide_ids=None,
    allow_duplicate_files: bool = False,
    progress: bool = False,
):
    """Leave-one-patient-out slide retrieval: every labelled slide queries the rest.

    ``by`` / ``white_filter`` choose the mosaic (:meth:`StoreIndex.mosaic`: SISH's colour histograms and
    white filter by default).

    Returns (table, per-query DataFrame with slide_id, label, site, retrieved labels, query_s, and
    query_ms (mean per slide, mosaic included)).
    """
    import pandas as pd

    from workbench.validate import check_int, check_int_list

    ks = check_int_list("ks", ks, 1, 100_000)
    check_int("k_tiles", k_tiles, 1)
    check_duplicate_files(store_index, allow=allow_duplicate_files)
    slides = store_index.slides
    if slide_ids is None:
        slide_ids = slides.loc[slides[label].notna(), "slide_id"].tolist()
    kmax = max(ks)
    records = []
    from workbench.progress import progress_bar

    for sid in progress_bar(slide_ids, desc=f"slide queries ({ranking})", unit="slide", disable=not progress):
        t0 = time.perf_counter()
        ranked = store_index.query_slide(
            sid,
            k_tiles=k_tiles,
            ranking=ranking,
            label=label,
            by=by,
            white_filter=white_filter,
            max_distance=max_distance,
        )
        dt = time.perf_counter() - t0
        rec = slides.loc[slides["slide_id"] == sid].iloc[0]
        records.append(
            {
                "slide_id": sid,
                "label": rec[label],
                "site": rec["site"],
                "retrieved": ranked["label"].tolist()[:kmax],
                "retrieved_slides": ranked["slide_id"].tolist()[:kmax],
                "query_s": dt,
            }
        )
    per_query = pd.DataFrame(records)
    if per_query.empty:
        raise ValueError(f"no slides with a {label!r} label to query")
    sites = per_query["site"].to_numpy() if per_query["site"].notna().any() else None
    table = slide_retrieval_metrics(
        per_query["label"].to_numpy(), labels_matrix(per_query["retrieved"], kmax), ks, sites=sites
    )
    return table, per_query, 1e3 * float(per_query["query_s"].mean())


def synthetic_tile_labels(store_index) -> np.ndarray:
    """(N,) ground-truth class name of every tile of a store of synthetic slides (majority class of its
    footprint, from :func:`workbench.io.synthetic.tile_truth`); None where the truth is background."""
    from workbench.io.synthetic import CLASS_NAMES, load_truth, tile_truth
    from workbench.store import open_store, read_slide

    root = open_store(store_index.store)
    parts = []
    for sid in store_index.slides["slide_id"]:
        info = read_slide(root, sid)
        truth = tile_truth(load_truth(info["path"]), info["coords"], info["size0"])
        cls = _majority_class(truth)
        names = np.asarray(CLASS_NAMES, dtype=object)[np.asarray(cls, dtype=np.int64)]
        parts.append(np.where(names == "background", None, names))
    return np.concatenate(parts) if parts else np.empty(0, dtype=object)


def _majority_class(truth):
    for key in ("majority_class", "class", "label", "cls"):
        try:
            return np.asarray(truth[key])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    raise KeyError(f"tile_truth() returned no majority class column (got {type(truth).__name__})")


def chance_slide_metrics(slides, *, label: str = "diagnosis", ks=(1, 5), n_perm: int = 200, random_state: int = 0):
    """Slide metrics of a random ranking (the chance level): each labelled slide ranks the slides of other
    patients in random order. ``slides`` is :attr:`StoreIndex.slides`. Returns the ``overall`` row as a dict."""
    rng = np.random.default_rng(random_state)
    s = slides[slides[label].notna()].reset_index(drop=True)
    labels, groups = s[label].to_numpy(dtype=object), s["group"].to_numpy()
    kmax = max(ks)
    q, r = [], []
    for _ in range(n_perm):
        for i in range(len(s)):
            pool = np.flatnonzero(groups != groups[i])
            q.append(labels[i])
            r.append(labels[rng.permutation(pool)[:kmax]].tolist())
    table = slide_retrieval_metrics(np.asarray(q, dtype=object), labels_matrix(r, kmax), ks)
    return table.loc["overall"].drop("level").to_dict()
