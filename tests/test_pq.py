"""ProductQuantizer: round trips, scoring identities, determinism, serialization, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctxcore
from ctxcore.exceptions import (
    ConfigError,
    CorruptDataError,
    CtxcoreError,
    DeviceError,
    DTypeError,
    FormatVersionError,
    InsufficientDataError,
    NonFiniteError,
    NotTrainedError,
    ShapeError,
)


def data(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_t(4, size=(n, dim)).astype(np.float32)


@pytest.fixture(scope="module", params=[(64, 16, 8), (64, 32, 4), (64, 64, 4), (48, 3, 4)], ids=str)
def trained(request):
    dim, m, nbits = request.param
    x = data(3000, dim)
    pq = ctxcore.ProductQuantizer(dim=dim, m=m, nbits=nbits)
    pq.train(x, iters=10, seed=0)
    return pq, x


def test_properties(trained):
    pq, _ = trained
    assert pq.dsub == pq.dim // pq.m
    assert pq.ksub == 2**pq.nbits
    assert pq.code_bytes == (pq.m * pq.nbits + 7) // 8
    c = pq.centroids
    assert c.dtype == np.float32 and c.shape == (pq.m, pq.ksub, pq.dsub)
    assert "trained" in repr(pq)


def test_round_trip_is_a_projection(trained):
    pq, x = trained
    codes = pq.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (len(x), pq.code_bytes)
    y = pq.decode(codes)
    assert y.dtype == np.float32 and y.shape == x.shape
    # Every decoded sub-vector is a centroid, and re-encoding it gives the same code.
    np.testing.assert_array_equal(pq.encode(y), codes)
    # Reconstruction is the nearest centroid: no centroid is closer than the chosen one.
    c = pq.centroids
    xs = x[:200].reshape(200, pq.m, pq.dsub)
    d2 = ((xs[:, :, None, :] - c[None]) ** 2).sum(-1)  # [n, m, ksub]
    chosen = ((xs - y[:200].reshape(200, pq.m, pq.dsub)) ** 2).sum(-1)
    np.testing.assert_allclose(chosen, d2.min(-1), rtol=1e-4, atol=1e-4)
    # And it is a real compression of the data (16 centroids in 16-d noise explain far less).
    assert ((x - y) ** 2).mean() < (0.6 if pq.dsub <= 4 else 0.9) * (x**2).mean()


def test_scores_equal_decoded_products(trained):
    pq, x = trained
    codes = pq.encode(x)
    y = pq.decode(codes).astype(np.float64)
    q = data(7, pq.dim, seed=3)
    ip = pq.inner_products(q, codes)
    assert ip.shape == (7, len(x)) and ip.dtype == np.float32
    np.testing.assert_allclose(ip, q @ y.T, rtol=1e-4, atol=1e-3)
    l2 = pq.l2_distances(q, codes)
    ref = ((q[:, None, :].astype(np.float64) - y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(l2, ref, rtol=1e-4, atol=1e-3)
    luts = pq.lookup_tables(q)
    assert luts.shape == (7, pq.m, pq.ksub)


def test_pack_order_matches_faiss_convention():
    """4-bit: subquantizer j lives in byte j // 2, low nibble for even j."""
    pq = ctxcore.ProductQuantizer(dim=4, m=4, nbits=4)
    x = data(400, 4)
    pq.train(x, iters=5)
    codes = pq.encode(x[:50])
    c = pq.centroids
    for i in range(50):
        idx = [((x[i, j] - c[j, :, 0]) ** 2).argmin() for j in range(4)]
        assert codes[i, 0] == idx[0] | (idx[1] << 4)
        assert codes[i, 1] == idx[2] | (idx[3] << 4)


def test_torch_in_torch_out(trained):
    torch = pytest.importorskip("torch")
    pq, x = trained
    xt = torch.from_numpy(x[:100])
    codes = pq.encode(xt)
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
    np.testing.assert_array_equal(codes.numpy(), pq.encode(x[:100]))
    y = pq.decode(codes)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    s = pq.inner_products(xt[:2], codes)
    assert isinstance(s, torch.Tensor) and tuple(s.shape) == (2, 100)
    # Non-contiguous tensors are accepted (copied).
    np.testing.assert_array_equal(pq.encode(xt.t().contiguous().t()).numpy(), codes.numpy())


def test_non_contiguous_numpy_accepted(trained):
    pq, x = trained
    wide = np.repeat(x[:50], 2, axis=1)[:, ::2]
    assert not wide.flags.c_contiguous
    np.testing.assert_array_equal(pq.encode(wide), pq.encode(np.ascontiguousarray(wide)))
    f = np.asfortranarray(x[:50])
    np.testing.assert_array_equal(pq.encode(f), pq.encode(x[:50]))


def test_determinism_and_seed_sensitivity():
    x = data(2000, 32, seed=1)
    a = ctxcore.ProductQuantizer(32, 8, 8)
    b = ctxcore.ProductQuantizer(32, 8, 8)
    a.train(x, iters=8, seed=11)
    b.train(x, iters=8, seed=11)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    # Thread count does not change the result.
    n = ctxcore.get_num_threads()
    try:
        ctxcore.set_num_threads(1)
        c = ctxcore.ProductQuantizer(32, 8, 8)
        c.train(x, iters=8, seed=11)
    finally:
        ctxcore.set_num_threads(n)
    np.testing.assert_array_equal(a.centroids, c.centroids)
    d = ctxcore.ProductQuantizer(32, 8, 8)
    d.train(x, iters=8, seed=12)
    assert not np.array_equal(a.centroids, d.centroids)


def test_serialization_round_trip(trained, tmp_path):
    pq, x = trained
    b = pq.to_bytes()
    pq2 = ctxcore.ProductQuantizer.from_bytes(b)
    assert pq2 == pq and pq2.is_trained
    np.testing.assert_array_equal(pq2.encode(x[:100]), pq.encode(x[:100]))
    pq3 = pickle.loads(pickle.dumps(pq))
    np.testing.assert_array_equal(pq3.centroids, pq.centroids)
    # Untrained quantizers round-trip too.
    u = ctxcore.ProductQuantizer(16, 4, 4)
    u2 = ctxcore.ProductQuantizer.from_bytes(u.to_bytes())
    assert not u2.is_trained and (u2.dim, u2.m, u2.nbits) == (16, 4, 4)


def test_corrupted_bytes_are_rejected(trained):
    pq, _ = trained
    b = pq.to_bytes()
    for cut in (0, 5, 39, len(b) // 2, len(b) - 1):
        with pytest.raises(CorruptDataError):
            ctxcore.ProductQuantizer.from_bytes(b[:cut])
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(b), size=50, replace=False):
        bad = bytearray(b)
        bad[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(CorruptDataError):
            ctxcore.ProductQuantizer.from_bytes(bytes(bad))
    bad = bytearray(b)
    bad[8] = 2  # format version 2
    with pytest.raises(FormatVersionError, match="version 2"):
        ctxcore.ProductQuantizer.from_bytes(bytes(bad))
    with pytest.raises(CorruptDataError, match="magic"):
        ctxcore.ProductQuantizer.from_bytes(b"NOTAPQ!!" + b[8:])


# --- bad input: each with a clear, typed error --------------------------------------------------


def test_config_errors():
    with pytest.raises(ConfigError, match="not divisible"):
        ctxcore.ProductQuantizer(dim=64, m=7)
    with pytest.raises(ConfigError, match="nbits must be 4 or 8"):
        ctxcore.ProductQuantizer(dim=64, m=16, nbits=6)
    with pytest.raises(ConfigError):
        ctxcore.ProductQuantizer(dim=0, m=1)
    with pytest.raises(ConfigError):
        ctxcore.ProductQuantizer(dim=8, m=16)
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        ctxcore.ProductQuantizer(dim=64, m=0)
    pq = ctxcore.ProductQuantizer(8, 2, 4)
    with pytest.raises(ConfigError, match="iters"):
        pq.train(data(100, 8), iters=-1)


def test_not_trained():
    pq = ctxcore.ProductQuantizer(16, 4, 8)
    x = data(10, 16)
    for call in (
        lambda: pq.encode(x),
        lambda: pq.decode(np.zeros((2, 4), np.uint8)),
        lambda: pq.inner_products(x, np.zeros((2, 4), np.uint8)),
        lambda: pq.l2_distances(x, np.zeros((2, 4), np.uint8)),
    ):
        with pytest.raises(NotTrainedError, match="call train"):
            call()
    assert pq.centroids is None


def test_too_few_training_vectors():
    pq = ctxcore.ProductQuantizer(16, 4, 8)
    with pytest.raises(InsufficientDataError, match="at least 256"):
        pq.train(data(255, 16))
    pq4 = ctxcore.ProductQuantizer(16, 4, 4)
    pq4.train(data(16, 16), iters=3)  # exactly 2**nbits is enough
    assert pq4.is_trained


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(trained, bad):
    pq, x = trained
    y = x[:300].copy()
    y[123, 5] = bad
    with pytest.raises(NonFiniteError, match="row 123, column 5"):
        pq.encode(y)
    fresh = ctxcore.ProductQuantizer(pq.dim, pq.m, pq.nbits)
    z = x.copy()
    z[7, 1] = bad
    with pytest.raises(NonFiniteError, match="row 7, column 1"):
        fresh.train(z, iters=2)
    assert not fresh.is_trained
    q = x[:2].copy()
    q[1, 0] = bad
    with pytest.raises(NonFiniteError):
        pq.inner_products(q, pq.encode(x[:10]))


def test_wrong_dtype(trained):
    pq, x = trained
    with pytest.raises(DTypeError, match="float32.*float64"):
        pq.encode(x.astype(np.float64))
    with pytest.raises(DTypeError, match="uint8"):
        pq.decode(pq.encode(x[:4]).astype(np.int32))
    with pytest.raises(DTypeError):
        pq.train(x.astype(np.float16))
    with pytest.raises(TypeError):  # DTypeError is a TypeError too
        pq.encode(x.astype(np.int64))


def test_wrong_rank_or_width(trained):
    pq, x = trained
    with pytest.raises(ShapeError, match=r"x\[None, :\]"):
        pq.encode(x[0])
    with pytest.raises(ShapeError):
        pq.encode(x[None])
    with pytest.raises(ShapeError, match=f"\\[n, {pq.dim}\\]"):
        pq.encode(np.zeros((3, pq.dim + 1), np.float32))
    with pytest.raises(ShapeError, match="code_bytes"):
        pq.decode(np.zeros((3, pq.code_bytes + 1), np.uint8))
    with pytest.raises(ShapeError):
        pq.inner_products(x[:2], np.zeros((3, pq.code_bytes - 1), np.uint8))
    with pytest.raises(ShapeError):
        pq.inner_products(x[:2, :-1], pq.encode(x[:3]))


def test_device_error_for_cuda_tensors(trained):
    torch = pytest.importorskip("torch")
    pq, x = trained
    meta = torch.empty((4, pq.dim), dtype=torch.float32, device="meta")
    with pytest.raises(DeviceError, match="cpu"):
        pq.encode(meta)


def test_empty_inputs(trained):
    pq, x = trained
    codes = pq.encode(x[:0])
    assert codes.shape == (0, pq.code_bytes)
    assert pq.decode(codes).shape == (0, pq.dim)
    assert pq.inner_products(x[:3], codes).shape == (3, 0)
    assert pq.inner_products(x[:0], pq.encode(x[:5])).shape == (0, 5)


def test_all_errors_are_ctxcore_errors():
    for cls in (ConfigError, NotTrainedError, ShapeError, DTypeError, NonFiniteError, CorruptDataError):
        assert issubclass(cls, CtxcoreError)


# --- property-based ----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dim_m=st.sampled_from([(4, 1), (4, 4), (6, 3), (8, 2), (12, 6), (16, 16), (20, 5), (32, 32)]),
    nbits=st.sampled_from([4, 8]),
    n=st.integers(0, 70),
    seed=st.integers(0, 2**32),
    scale=st.floats(1e-3, 1e3),
)
def test_property_scores_match_decode(dim_m, nbits, n, seed, scale):
    dim, m = dim_m
    rng = np.random.default_rng(seed)
    train = (rng.standard_normal((max(2**nbits, 40), dim)) * scale).astype(np.float32)
    pq = ctxcore.ProductQuantizer(dim, m, nbits)
    pq.train(train, iters=3, seed=seed)
    x = (rng.standard_normal((n, dim)) * scale).astype(np.float32)
    codes = pq.encode(x)
    y = pq.decode(codes).astype(np.float64)
    # Re-encoding a codeword finds it again, up to near-ties: k-means can leave two centroids
    # closer together than float32 distance rounding (||c||^2 - 2 x.c), most often with 256
    # centroids on one dimension; then either is nearest to within that rounding.
    again = pq.encode(y.astype(np.float32))
    near_tie = np.sqrt(1e-6 * pq.dsub) * max(float(np.abs(y).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(pq.decode(again), y, rtol=0, atol=near_tie)
    assert (again != codes).sum() <= max(1, codes.size // 20)
    q = (rng.standard_normal((3, dim)) * scale).astype(np.float32)
    tol = 1e-4 * scale * scale * dim
    np.testing.assert_allclose(pq.inner_products(q, codes), q @ y.T, rtol=1e-4, atol=tol)
    ref = ((q[:, None, :] - y[None]) ** 2).sum(-1)
    np.testing.assert_allclose(pq.l2_distances(q, codes), ref, rtol=1e-4, atol=tol)
    assert ctxcore.ProductQuantizer.from_bytes(pq.to_bytes()) == pq


def test_fast_scan_error_bound(trained):
    pq, x = trained
    codes = pq.encode(x)
    q = data(5, pq.dim, seed=8)
    exact = pq.inner_products(q, codes)
    fast = pq.inner_products(q, codes, fast=True)
    assert fast.shape == exact.shape and fast.dtype == np.float32
    if pq.nbits == 8:
        np.testing.assert_array_equal(fast, exact)
        return
    assert not np.array_equal(fast, exact)  # the quantized-table path really ran
    luts = pq.lookup_tables(q)
    span = (luts.max(-1) - luts.min(-1)).max(-1)  # [nq]
    bound = pq.m * span / 510 + 1e-4 * np.abs(exact).max()
    assert (np.abs(fast - exact) <= bound[:, None]).all()
    # Good enough to rank: the exact top-1 is within the fast scan's top-10 for every query.
    top_fast = np.argsort(-fast, axis=1)[:, :10]
    assert all(exact[i].argmax() in top_fast[i] for i in range(len(q)))
    l2_exact = pq.l2_distances(q, codes)
    l2_luts = pq.lookup_tables(q, "l2")
    l2_bound = pq.m * (l2_luts.max(-1) - l2_luts.min(-1)).max(-1) / 510 + 1e-4 * l2_exact.max()
    assert (np.abs(pq.l2_distances(q, codes, fast=True) - l2_exact) <= l2_bound[:, None]).all()


@pytest.mark.parametrize(("m", "nbits"), [(16, 8), (32, 4), (64, 4)])
def test_heavy_tailed_mse_within_5_percent_of_faiss(m, nbits):
    """Student-t (3 dof) data with a few outlier channels, like attention keys: ctxcore's
    reconstruction MSE is within 5% of faiss ProductQuantizer's (same m, nbits, iterations, data)."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(20_000, 64)).astype(np.float32)
    x[:, rng.choice(64, size=4, replace=False)] *= 8.0
    pq = ctxcore.ProductQuantizer(64, m, nbits)
    pq.train(x, iters=25, seed=0)
    ours = float(((x - pq.decode(pq.encode(x))) ** 2).mean())
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        fpq = faiss.ProductQuantizer(64, m, nbits)
        fpq.cp.niter = 25
        fpq.cp.seed = 0
        fpq.cp.min_points_per_centroid = 1  # only silences faiss's "provide more points" warning
        fpq.train(x)
        theirs = float(((x - fpq.decode(fpq.compute_codes(x))) ** 2).mean())
    finally:
        faiss.omp_set_num_threads(threads)
    assert ours <= 1.05 * theirs, f"ctxcore MSE {ours:.4g} vs faiss {theirs:.4g}"
