"""Scale paths: k-means over store chunks on a Dask cluster, GPU-path logic on CPU (NumPy for CuPy,
capped candidates), compressed search with exact re-rank."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.curate import cluster as hc
from workbench.curate import kmeans as km


def mixture(n=6000, d=16, k=10, seed=0, nan_rows=(5, 77)):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 4
    x = (centres[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)
    x[list(nan_rows)] = np.nan
    return x


@pytest.fixture(scope="module")
def zarr_rows(tmp_path_factory):
    import zarr

    x = mixture()
    path = tmp_path_factory.mktemp("scale") / "x.zarr"
    arr = zarr.create_array(str(path), shape=x.shape, chunks=(1000, x.shape[1]), dtype="float16")
    arr[:] = x.astype(np.float16)
    return arr, x.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl,
        distributed.Client(cl) as client,
    ):
        yield client


def test_assign_chunks_on_dask_equals_single_process(zarr_rows, dask_client):
    arr, x = zarr_rows
    C = np.nan_to_num(x[np.arange(0, 6000, 600)])
    local = km.assign_chunks(arr, C)
    remote = km.assign_chunks(arr, C, client=dask_client)
    by_addr = km.assign_chunks(arr, C, client=dask_client.scheduler.address, labels=False)
    np.testing.assert_array_equal(remote["labels"], local["labels"])
    np.testing.assert_array_equal(remote["counts"], local["counts"])
    np.testing.assert_array_equal(remote["sums"], local["sums"])
    assert remote["inertia"] == local["inertia"] == by_addr["inertia"]
    # the per-chunk path agrees with the in-memory reference: nearest centroid by brute force
    ok = np.isfinite(x).all(1)
    ref = ((x[ok, None, :] - C[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(local["labels"][ok], ref)
    assert (local["labels"][~ok] == -1).all() and local["bad"] == 2 and local["counts"].sum() == ok.sum()
    # sums are the per-cluster sums of the finite rows
    np.testing.assert_allclose(local["sums"][3], x[ok][ref == 3].sum(0, dtype=np.float64), rtol=1e-5)


def test_block_partials_blocks_the_matmul_and_keeps_huge_finite_rows():
    """The chunk kernel: float16 rows widened once, the matmul in cache-sized row blocks (k = 300 makes 3,495-row
    blocks, so 8,000 rows take 3), labels equal to the brute-force nearest centroid; a finite row whose norm
    overflows float32 stays in (its label is its nearest centroid), NaN/Inf rows are left out."""
    rng = np.random.default_rng(3)
    C = rng.normal(size=(300, 24)).astype(np.float32)
    x16 = (C[rng.integers(0, 300, 8000)] + 0.3 * rng.normal(size=(8000, 24))).astype(np.float16)
    x16[7] = np.inf
    p = km.block_partials(x16, C)
    x = x16.astype(np.float32)
    ok = np.isfinite(x).all(1)
    ref = ((x[ok, None, :] - C[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(p["labels"][ok], ref)
    assert p["labels"][7] == -1 and np.isnan(p["sqdist"][7]) and p["bad"] == 1 and p["counts"].sum() == ok.sum()
    np.testing.assert_allclose(p["sums"][ref[0]], x[ok][ref == ref[0]].sum(0, dtype=np.float64), rtol=1e-5)
    d_ref = ((x[ok] - C[ref]) ** 2).sum(1)
    np.testing.assert_allclose(p["sqdist"][ok], d_ref, rtol=1e-3, atol=1e-3)
    big = np.vstack([x[:4], np.full((1, 24), 1e20, np.float32)])  # finite, but its squared norm overflows
    pb = km.block_partials(big, C)
    assert pb["bad"] == 0 and pb["labels"][4] >= 0 and pb["counts"].sum() == 5
    np.testing.assert_array_equal(pb["labels"][:4], p["labels"][:4])


def test_lloyd_chunks_on_dask_identical_and_converges(zarr_rows, dask_client):
    import dask.array as da

    arr, x = zarr_rows
    C0 = np.nan_to_num(x[:10])
    C1, lab1, d1, h1 = km.lloyd_chunks(arr, C0, n_iter=5)
    C2, lab2, d2, h2 = km.lloyd_chunks(arr, C0, n_iter=5, client=dask_client)
    C3, lab3, _, _ = km.lloyd_chunks(da.from_zarr(arr), C0, n_iter=5, client=dask_client)  # Dask input
    np.testing.assert_array_equal(C1, C2)
    np.testing.assert_array_equal(C1, C3)
    np.testing.assert_array_equal(lab1, lab2)
    np.testing.assert_array_equal(lab1, lab3)
    assert h1 == h2 and h1[-1] < 0.8 * h1[0]  # inertia falls from the poor seeds
    # centroids are exact means of their clusters' (finite) rows, up to the last update
    ok = lab1 >= 0
    _, lab_prev, _, _ = km.lloyd_chunks(arr, C0, n_iter=4)
    np.testing.assert_allclose(C1[2], x[ok & (lab_prev == 2)].mean(0), rtol=1e-4, atol=1e-4)


def test_hierarchical_fit_with_client_equals_without(zarr_rows, dask_client):
    arr, _ = zarr_rows
    kw = dict(levels=[20, 4], fit_sample_per_cluster=50, backend="torch", n_iter=20, stream_iter=2, random_state=0)
    a = hc.HierarchicalKMeans(**kw).fit(arr)
    b = hc.HierarchicalKMeans(**kw).fit(arr, client=dask_client)
    np.testing.assert_array_equal(a.point_labels_, b.point_labels_)
    for ca, cb in zip(a.cluster_centers_, b.cluster_centers_):
        np.testing.assert_array_equal(ca, cb)
    assert a.n_invalid_ == 2 and len(a.stream_inertia_) == 3
    assert a.stream_inertia_[-1] <= a.stream_inertia_[0]


# --------------------------------------------------------------------------- GPU logic, NumPy standing in


class FakeDaskKMeans:
    """Stands in for cuml.dask.cluster.KMeans: records its arguments, runs Lloyd on the (NumPy) blocks."""

    seen = {}

    def __init__(self, *, client, n_clusters, init, n_init, max_iter, tol, random_state):
        FakeDaskKMeans.seen = dict(init=init, n_clusters=n_clusters, max_iter=max_iter, n_init=n_init)
        self.init, self.max_iter = init, max_iter

    def fit(self, Xd):
        blocks = [b.compute() for b in Xd.to_delayed().ravel()]
        FakeDaskKMeans.seen["block_types"] = {type(b).__name__ for b in blocks}
        X = np.concatenate(blocks)
        C = np.array(self.init, copy=True)
        for _ in range(self.max_iter):
            lab = ((X[:, None] - C[None]) ** 2).sum(-1).argmin(1)
            C = np.stack([X[lab == j].mean(0) if (lab == j).any() else C[j] for j in range(len(C))])
        self.cluster_centers_ = C
        return self


class FakeClient:
    def scheduler_info(self):
        return {"workers": {"a": {}, "b": {}}}

    def persist(self, x):
        return x


def test_cuml_dask_path_uses_given_centroids_and_device_blocks():
    x = mixture(nan_rows=())[:900]
    C0 = x[[0, 300, 600]].copy()
    C = km._kmeans_cuml_dask(x, C0, 7, 0, FakeClient(), xp=np, KMeans=FakeDaskKMeans)
    seen = FakeDaskKMeans.seen
    np.testing.assert_array_equal(seen["init"], C0)  # the tree's seeds, not cuML's own k-means||
    assert seen["n_init"] == 1 and seen["max_iter"] == 7 and seen["n_clusters"] == 3
    assert seen["block_types"] == {"ndarray"}  # blocks went through xp.asarray (cupy.asarray on a GPU)
    ref, *_ = km.lloyd_chunks(x, C0, n_iter=7)
    np.testing.assert_allclose(C, ref, rtol=1e-4, atol=1e-4)


def test_array_module_dispatch():
    a = np.ones(3)
    assert km.array_module(a) is np
    assert km.to_host(a) is not None and km.to_host(a).sum() == 3

    class FakeCupy:  # a CuPy array refuses np.asarray; to_host must call .get()
        __module__ = "cupy._core.core"

        def get(self):
            return np.arange(4)

        def __array__(self, *a, **k):
            raise TypeError("Implicit conversion to a NumPy array is not allowed")

    import sys
    import types

    sys.modules.setdefault("cupy", types.ModuleType("cupy"))
    try:
        np.testing.assert_array_equal(km.to_host(FakeCupy()), np.arange(4))
    finally:
        if type(sys.modules["cupy"]) is types.ModuleType and not hasattr(sys.modules["cupy"], "ndarray"):
            del sys.modules["cupy"]


# --------------------------------------------------------------------------- index registry, ivfpq, widening

from workbench.search import retrieval as R  # noqa: E402


@pytest.fixture(scope="module")
def clustered():
    """40 tight clusters of 100 rows (one group per cluster) in 32-d, and queries drawn near 20 of them."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 32))
    lab = np.repeat(np.arange(40), 100)
    x = (centres[lab] + 0.35 * rng.normal(size=(4000, 32))).astype(np.float32)
    q = (centres[:20] + 0.35 * rng.normal(size=(20, 32))).astype(np.float32)
    return x, lab, q


def exact(x, q, k, mask=None):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ xn.T
    if mask is not None:
        s[mask] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_registry_prints_as_table_and_one_class_adds_a_kind(clustered):
    x, lab, q = clustered
    table = str(R.KINDS)
    for name in ("flat", "ivf", "hnsw", "ivfpq"):
        assert name in table
    assert "re-ranked" in table and "parameters" in table

    @R.register_kind
    class IVFSQ8(R.IndexKind):
        name, summary, params, trained = "ivfsq8", "IVF + 8-bit scalar quantiser", ("nlist", "nprobe"), True

        def new(self, ti, d, n):
            import faiss

            return faiss.index_factory(d, f"IVF{ti._nlist(n)},SQ8", faiss.METRIC_INNER_PRODUCT)

        def configure(self, ti, index):
            index.nprobe = int(ti.nprobe)

        def probes(self, ti, index):
            return int(ti.nprobe), int(index.nlist)

    try:
        assert "ivfsq8" in str(R.KINDS)
        idx = R.TileIndex("ivfsq8", nlist=16, nprobe=16).fit(x, groups=lab)
        _, ids = idx.search(q, 10, exclude_groups=np.arange(20))
        ref = exact(x, q, 10, lab[None, :] == np.arange(20)[:, None])
        assert (ids >= 0).all() and (lab[ids] != np.arange(20)[:, None]).all()
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)]) >= 0.8
    finally:
        del R.KINDS["ivfsq8"]
    with pytest.raises(ValueError, match="kind must be one of"):
        R.TileIndex("ivfsq8").fit(x)


def test_ivfpq_rerank_is_exact_and_beats_the_codes(clustered, tmp_path):
    x, lab, q = clustered
    ref = exact(x, q, 10)
    idx = R.TileIndex("ivfpq", nlist=32, nprobe=8, pq_m=4, pq_bits=8, rerank=200).fit(x, groups=lab)
    assert idx.spec.factory_string(idx, 32, 4000) == "IVF32_HNSW32,PQ4x8"
    scores, ids = idx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
    assert recall >= 0.97, recall
    # the scores are exact cosine similarities of the returned rows, best first
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(
        scores, np.einsum("qkd,qd->qk", xn[ids].astype(np.float16).astype(np.float32), qn), atol=2e-3
    )
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # without the re-rank (codes only, 4 bytes per row) recall is clearly worse
    codes = R.TileIndex("ivfpq", nlist=32, nprobe=8, pq_m=4, pq_bits=8, rerank=10).fit(x)
    _, ids_codes = codes.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_codes, ref)]) < recall - 0.1
    # saved and loaded: re-ranks once the features are attached (from a Zarr array: the raw-chunk reader)
    import zarr

    path = idx.save(tmp_path / "pq.faiss")
    z = zarr.create_array(str(tmp_path / "f.zarr"), shape=x.shape, chunks=(1000, 32), dtype="float16", compressors=None)
    z[:] = x.astype(np.float16)
    back = R.TileIndex.load(path, features=z)
    assert back._features._maps is not None  # memory-mapped chunk files
    s2, i2 = back.search(q, 10)
    np.testing.assert_array_equal(i2, ids)
    np.testing.assert_allclose(s2, scores, atol=1e-6)
    # leave-one-group-out on the compressed index
    _, ex = idx.search(q, 10, exclude_groups=np.arange(20))
    assert (ex >= 0).all() and (lab[ex] != np.arange(20)[:, None]).all()


def hard_mixture(n, d, components, noise=0.6, seed=0):
    """Unit rows of isotropic Gaussian components (benchmarks/scale_data.py's hard mixture, small)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((components, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, components, n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_defaults_for_n_and_d_keep_the_true_neighbours():
    """The library's ivfpq defaults (fast-scan d/4-byte codes, 1,000 re-ranked) on a hard mixture with known
    exact truth: recall@10 >= 0.97, where the former defaults (d/16 bytes of 8-bit codes, 256 re-ranked) lose
    the true neighbours in the PQ ranking (0.93 here, 0.76 at 10^6 x 384)."""
    kind = R.KINDS["ivfpq"]
    assert kind.defaults(10**7, 384) == {"nlist": 4096, "pq_bits": 4, "nprobe": 16, "rerank": 1000}
    assert kind.defaults(10**5, 384)["nlist"] == 1264  # 4 * sqrt(n) below the cap
    assert kind.default_m(384, 4) == 96 and kind.default_m(384, 8) == 48
    n, d = 10000, 32
    x = hard_mixture(n + 100, d, 20)
    q, x = x[n:], x[:n]
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])

    idx = R.TileIndex("ivfpq").fit(x)
    assert idx.spec.factory_string(idx, d, n) == "IVF256_HNSW32,PQ16x4fs" and idx.rerank == 1000
    assert idx.nprobe == 16 and idx.get_params()["pq_bits"] == 4
    _, ids = idx.search(q, 10)
    assert recall(ids) >= 0.97, recall(ids)
    old = R.TileIndex("ivfpq", pq_m=d // 16, pq_bits=8, rerank=256).fit(x)
    _, ids_old = old.search(q, 10)
    assert recall(ids_old) < 0.96, recall(ids_old)
    with pytest.raises(R.ParameterError, match="pq_bits"):
        R.TileIndex("ivfpq", pq_bits=6).fit(x[:2000])


def test_store_ivfpq_reranks_from_its_raw_copy(tmp_path, caplog):
    """build_store_index writes the raw float16 re-rank copy; load_store_index memory-maps it (one gather per
    query) and falls back, with a warning, to the store's compressed features when the copy is stale."""
    import json
    import logging

    from test_retrieval import brute_force, make_feature_store

    path, _ = make_feature_store(tmp_path / "ds.zarr", n_slides=6)
    si = R.build_store_index(path, "toy", "ivfpq")
    copy = R.rerank_rows_path(path, "toy", "ivfpq")
    assert copy.exists() and copy.stat().st_size == si.index.n_ * si.index.dim_ * 2
    back = R.load_store_index(path, "toy", "ivfpq")
    assert isinstance(back.index._features.x, np.memmap)
    feats = np.asarray(back.features, dtype=np.float32)
    groups = np.repeat(back.slides["group"].to_numpy(), back.slides["n_tiles"].to_numpy())
    q = np.arange(0, len(feats), 5)
    _, ids = back.query_tiles(q, 10)
    _, ref = brute_force(feats, groups, feats[q], groups[q], 10)  # every row is a candidate: exact
    np.testing.assert_array_equal(ids, ref)
    meta = json.loads(copy.with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**meta, "digest": "other"}))
    with caplog.at_level(logging.WARNING, logger="workbench.search.retrieval"):
        stale = R.load_store_index(path, "toy", "ivfpq")
    assert "no re-rank copy" in caplog.text and not isinstance(stale.index._features.x, np.memmap)
    np.testing.assert_array_equal(stale.query_tiles(q, 10)[1], ref)


def test_feature_rows_readers_agree(tmp_path):
    import dask.array as da
    import zarr

    x = np.random.default_rng(0).normal(size=(2500, 8)).astype(np.float16)
    raw = zarr.create_array(
        str(tmp_path / "raw.zarr"), shape=x.shape, chunks=(1000, 8), dtype="float16", compressors=None
    )
    packed = zarr.create_array(str(tmp_path / "packed.zarr"), shape=x.shape, chunks=(700, 8), dtype="float16")
    raw[:] = x
    packed[:] = x
    flat = R.write_rerank_rows(raw, tmp_path / "rows.f16", "d1")  # the raw copy a compressed store index reads
    assert R.open_rerank_rows(tmp_path / "rows.f16", "d1", x.shape) is not None
    assert R.open_rerank_rows(tmp_path / "rows.f16", "d2", x.shape) is None  # other features: not used
    rows = np.array([2499, 3, 3, 1000, 999, 1500])
    for src in (x, raw, packed, da.from_array(x, chunks=(600, 8)), flat):
        np.testing.assert_array_equal(R.FeatureRows(src)(rows), x[rows].astype(np.float32))
        np.testing.assert_array_equal(R.FeatureRows(src)(np.sort(rows[:3])), x[np.sort(rows[:3])].astype(np.float32))
    assert R.FeatureRows(raw)._maps is not None and R.FeatureRows(packed)._maps is None
    assert R.FeatureRows(flat).warm() >= 0 and R.FeatureRows(raw).warm() >= 0


def test_widening_on_a_capped_index_falls_back_and_fills_k(clustered):
    """The GPU path's logic on CPU: a candidate cap (faiss-gpu's 2048, here 16) that the exclusions exhaust."""
    x, lab, q = clustered
    groups = lab.copy()
    idx = R.TileIndex("flat").fit(x, groups=groups)
    # every query's 100 nearest rows are its own group: 16 candidates can never yield 10 others
    full_s, full_i = idx.search(q, 10, exclude_groups=np.arange(20))
    calls = []

    def raw(rows, fetch, nprobe):
        calls.append(fetch)
        return idx._raw_search(idx._prepare(q)[rows], fetch)

    keep = lambda rows, i_: groups[np.maximum(i_, 0)] != np.arange(20)[rows, None]  # noqa: E731
    s, i, short = R.widen_search(raw, 20, 10, possible=np.full(20, 10), cap=16, keep=keep)
    assert calls == [16] and set(short.tolist()) == set(range(20)) and (i == -1).all()
    # uncapped: the fetch doubles (28, 56, 112) until 10 survive, and equals the exact search
    calls.clear()
    s, i, short = R.widen_search(raw, 20, 10, possible=np.full(20, 10), cap=4000, keep=keep)
    assert calls == [28, 56, 112] and short.size == 0
    np.testing.assert_array_equal(i, full_i)
    # the TileIndex itself: pretend it is on a GPU with a 16-candidate cap; the CPU copy serves the rest
    idx.on_gpu_, idx._gpu_k_cap = True, 16
    idx._cpu_copy = idx.index_
    try:
        s2, i2 = idx.search(q, 10, exclude_groups=np.arange(20))
    finally:
        idx.on_gpu_ = False
    assert idx.cpu_fallbacks_ == 20
    np.testing.assert_array_equal(i2, full_i)
    np.testing.assert_allclose(s2, full_s)


def test_gpu_cluster_request_errors(monkeypatch):
    import sys

    from workbench.errors import ParameterError
    from workbench.features import embed

    with pytest.raises(ParameterError, match="gpus"):
        embed.gpu_cluster("some", n_visible=2)
    with pytest.raises(ParameterError, match="2 CUDA device"):
        embed.gpu_cluster([0, 3], n_visible=2)
    with pytest.raises(ParameterError, match="0 CUDA device"):
        embed.gpu_cluster("all", n_visible=0)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed
    with pytest.raises(ImportError, match="pip install dask-cuda"):
        embed.gpu_cluster("all", n_visible=2)

    class FakeCluster:  # what LocalCUDACluster receives
        def __init__(self, **kw):
            self.kw = kw

    import types

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=FakeCluster))
    assert embed.gpu_cluster("all", n_visible=3).kw["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert embed.gpu_cluster([1, 2], n_visible=3).kw["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert embed.gpu_cluster(1, n_visible=3).kw == {"CUDA_VISIBLE_DEVICES": "0", "threads_per_worker": 1}


def test_scale_benchmarks_run_at_10_7_only_with_the_scale_flag(monkeypatch):
    """`make benchmarks SCALE=1` (BENCH_SCALE=1) is what runs search_scale/assign_scale at 10^7 and writes their
    committed figures; quick and BENCH_FULL runs use 10^5 / 10^6 rows and write under results/quick/."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_results.py"
    spec = importlib.util.spec_from_file_location("bench_results", path)
    br = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(br)
    monkeypatch.delenv("BENCH_SCALE", raising=False)
    monkeypatch.delenv("BENCH_FULL", raising=False)
    assert br.scale_rows() == 10**5 and br.result_path("search_scale").parent.name == "quick"
    monkeypatch.setenv("BENCH_FULL", "1")
    assert br.scale_rows() == 10**6
    assert br.result_path("search_scale") == br.RESULTS / "quick" / "search_scale.json"
    assert br.result_path("kmeans") == br.RESULTS / "kmeans.json"  # other benchmarks: full mode as before
    monkeypatch.setenv("BENCH_SCALE", "1")
    assert br.scale_rows() == 10**7
    assert br.result_path("assign_scale") == br.RESULTS / "assign_scale.json"
    assert br.finish("search_scale", {})["mode"] == "scale" and br.finish("kmeans", {})["mode"] == "full"
    monkeypatch.setenv("BENCH_SCALE", "0")
    assert br.scale_rows() == 10**6
