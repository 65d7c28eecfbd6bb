"""KID and manifold precision / recall against brute-force references written from the papers'
definitions (loops over pairs), and their behaviour on laws that are equal or apart."""

import itertools

import numpy as np
import pytest

from diffusion_jax.evaluation import sample_metrics as sm


def _kid_loops(x, y):
    """Bińkowski et al. eq. 4 term by term: means of k over pairs i != j and over all (i, j)."""
    f = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / f + 1.0) ** 3
    xx = np.mean([k(x[i], x[j]) for i, j in itertools.permutations(range(len(x)), 2)])
    yy = np.mean([k(y[i], y[j]) for i, j in itertools.permutations(range(len(y)), 2)])
    xy = np.mean([k(a, b) for a in x for b in y])
    return xx + yy - 2.0 * xy


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 3)), rng.normal(0.5, 1.0, size=(7, 3))
    np.testing.assert_allclose(sm.kid(x, y), _kid_loops(x, y), rtol=1e-12)


def test_kid_stderr_is_the_delete_one_jackknife():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 2)), rng.normal(0.3, 1.2, size=(6, 2))
    loo = np.array([_kid_loops(np.delete(x, i, axis=0), y) for i in range(len(x))])
    want = np.sqrt((len(x) - 1) / len(x) * np.sum((loo - loo.mean()) ** 2))
    value, stderr = sm.kid_with_stderr(x, y)
    np.testing.assert_allclose(stderr, want, rtol=1e-10)
    np.testing.assert_allclose(value, _kid_loops(x, y), rtol=1e-12)


def test_kid_is_unbiased_for_equal_laws_and_sees_a_shift_with_few_samples():
    """Over 200 draws of 50 vs 50 points of one law the mean KID is 0 within 3 standard errors
    of that mean (the biased V-statistic would sit above it); 100 points shifted by 1 in one
    coordinate are apart by more than 4 of the jackknife's standard errors."""
    rng = np.random.default_rng(2)
    draws = [sm.kid(rng.normal(size=(50, 4)), rng.normal(size=(50, 4))) for _ in range(200)]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))
    shifted = rng.normal(size=(100, 4)) + np.array([1.0, 0, 0, 0])
    value, stderr = sm.kid_with_stderr(shifted, rng.normal(size=(400, 4)))
    assert value > 4 * stderr > 0


def _pr_loops(x, y, k):
    def radius(s, i):  # distance to the k-th nearest other point of s
        return sorted(np.linalg.norm(s[i] - s[j]) for j in range(len(s)) if j != i)[k - 1]

    def inside(p, s):
        return any(np.linalg.norm(p - s[j]) <= radius(s, j) for j in range(len(s)))

    return np.mean([inside(p, y) for p in x]), np.mean([inside(q, x) for q in y])


def test_precision_recall_are_kynkaanniemis_knn_manifolds():
    rng = np.random.default_rng(3)
    x = rng.normal(0.7, 0.5, size=(30, 2))  # a narrower, shifted sample set
    y = rng.normal(size=(40, 2))
    got = sm.precision_recall(x, y)
    precision, recall = _pr_loops(x, y, 3)
    assert got["precision"] == precision and got["recall"] == recall
    assert got["recall"] < got["precision"]  # the samples cover part of the data only
    np.testing.assert_allclose(got["precision_stderr"], np.sqrt(precision * (1 - precision) / 30))
    np.testing.assert_allclose(got["recall_stderr"], np.sqrt(recall * (1 - recall) / 40))


def test_bad_feature_sets_name_the_shapes():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"\[m, F\] and \[n, F\]; got \(5, 3\) and \(5, 2\)"):
        sm.kid(x, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="at least 4 points in each set; got 3 and 5"):
        sm.precision_recall(np.zeros((3, 3)), x)
    with pytest.raises(ValueError, match="at least 3 samples; got 2"):
        sm.kid_with_stderr(np.zeros((2, 3)), x)
