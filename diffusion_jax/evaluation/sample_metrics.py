"""Sample-quality statistics of two sets of features: KID and manifold precision / recall.

Pure NumPy (float64), on features such as the classifier's penultimate layer (``classifier``)
or Inception's pool3; a sample set ``x`` [m, F] against a reference set ``y`` [n, F].

- Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", eq. 4): the
  unbiased estimate of the squared maximum mean discrepancy under the cubic polynomial kernel
  k(a, b) = (a·b / F + 1)^3,

    MMD²_u = 1/(m(m-1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n-1)) Σ_{i≠j} k(y_i, y_j)
             - 2/(mn) Σ_{i,j} k(x_i, y_j),

  unbiased at any m, n ≥ 2 (hence its use at small sample counts, where the Fréchet distance is
  biased upwards by 1/m); it can be slightly negative when the two laws are equal. Its standard
  error (``kid_stderr``) is the delete-one jackknife over the samples, the reference held fixed:
  the spread due to the finite sample set, which is what separates two models judged against one
  reference.
- Precision and recall of the sample and data manifolds (Kynkäänniemi et al. 2019, eqs. 1–3):
  each set's manifold is the union of balls around its points with radius the distance to that
  point's k-th nearest neighbour in its own set (k = 3); precision = the share of samples inside
  the reference manifold, recall = the share of reference points inside the sample manifold.
  Standard errors sqrt(p (1 - p) / N) (binomial, N = the points counted): exact for precision
  given the reference (the samples are independent); for recall an approximation, since every
  reference point is judged by the same sample manifold.
"""

from __future__ import annotations

import numpy as np

PR_K = 3  # Kynkäänniemi et al.'s k for the k-NN radii


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a_i, b_j) = (a_i·b_j / F + 1)^3 [m, n] of a [m, F], b [n, F] (KID's kernel)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _check_sets(x: np.ndarray, y: np.ndarray, minimum: int) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [m, F] and [n, F]; got {x.shape} and {y.shape}.")
    if len(x) < minimum or len(y) < minimum:
        raise ValueError(f"need at least {minimum} points in each set; got {len(x)} and {len(y)}.")


def _off_diagonal_sum(k: np.ndarray) -> float:
    return float(k.sum() - np.trace(k))


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """MMD²_u of samples x [m, F] against reference y [n, F] under ``polynomial_kernel``."""
    return kid_with_stderr(x, y)[0]


def kid_with_stderr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(MMD²_u, its delete-one jackknife standard error over x), x [m >= 3, F], y [n >= 2, F].

    With A = Σ_{i≠j} k(x_i, x_j), r_i = Σ_{j≠i} k(x_i, x_j), B = Σ_{i,j} k(x_i, y_j) and
    c_i = Σ_j k(x_i, y_j), leaving x_i out gives A - 2 r_i and B - c_i, so all m estimates
    θ_(i) come from one kernel matrix; SE = sqrt((m-1)/m Σ_i (θ_(i) - mean θ)²).
    """
    _check_sets(x, y, 2)
    if len(x) < 3:
        raise ValueError(f"the jackknife needs at least 3 samples; got {len(x)}.")
    m, n = len(x), len(y)
    kxx = polynomial_kernel(x, x)  # [m, m]
    kxy = polynomial_kernel(x, y)  # [m, n]
    yy = _off_diagonal_sum(polynomial_kernel(y, y)) / (n * (n - 1))
    r = kxx.sum(axis=1) - np.diag(kxx)  # [m]
    c = kxy.sum(axis=1)  # [m]
    a, b = r.sum(), c.sum()
    full = a / (m * (m - 1)) + yy - 2.0 * b / (m * n)
    loo = (a - 2.0 * r) / ((m - 1) * (m - 2)) + yy - 2.0 * (b - c) / ((m - 1) * n)  # [m]
    stderr = np.sqrt((m - 1) / m * np.sum(np.square(loo - loo.mean())))
    return float(full), float(stderr)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a_i - b_j|² [m, n], clipped at 0 against rounding."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int = PR_K) -> np.ndarray:
    """Squared distance of each x_i [m, F] to its k-th nearest neighbour among the others [m]."""
    if not 1 <= k < len(x):
        raise ValueError(f"k={k} must be in [1, {len(x) - 1}] for {len(x)} points.")
    d = _squared_distances(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def manifold_coverage(points: np.ndarray, manifold: np.ndarray, k: int = PR_K) -> np.ndarray:
    """bool [m]: whether each of ``points`` [m, F] lies in the k-NN manifold of ``manifold``
    [n, F], i.e. |p - q| <= r_k(q) for some q (Kynkäänniemi et al. 2019, eq. 1)."""
    radii = knn_radii(manifold, k)  # [n]
    return np.any(_squared_distances(points, manifold) <= radii[None, :], axis=1)


def precision_recall(x: np.ndarray, y: np.ndarray, k: int = PR_K) -> dict[str, float]:
    """Precision (samples x [m, F] in the manifold of reference y [n, F]) and recall (y in the
    manifold of x), each with its binomial standard error (see the module docstring)."""
    _check_sets(x, y, k + 1)
    precision = float(np.mean(manifold_coverage(x, y, k)))
    recall = float(np.mean(manifold_coverage(y, x, k)))
    return dict(
        precision=precision,
        precision_stderr=float(np.sqrt(precision * (1 - precision) / len(x))),
        recall=recall,
        recall_stderr=float(np.sqrt(recall * (1 - recall) / len(y))),
    )
