"""Tolerances derived from error bounds, shared by the test files.

Rounding differs between machines (AVX2, AVX-512, XLA's code for each, the fused kernel built
for ``-march=native`` or a baseline ISA), so no tolerance is one machine's result: each comes
from the dtype's unit roundoff u, the magnitude of the values and the number of terms summed
(Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3: a sum or dot product of n
terms is off by at most γ_n times the sum of the terms' magnitudes, γ_n = n u / (1 − n u),
whatever the order or the vector width of the additions).
"""

from __future__ import annotations

import numpy as np

#: Roundings between a logit s and a Self-Classifier log-probability: the max shift, the
#: division by τ and the two log-sum-exp subtractions.
ROUNDINGS = 4


def unit_roundoff(dtype) -> float:
    """u = eps / 2 of a NumPy, torch, JAX or array-API floating dtype (or its name)."""
    try:
        return float(np.finfo(np.dtype(dtype)).eps) / 2
    except TypeError:  # torch.float32, array_api_strict.float64, ...
        return float(np.finfo(np.dtype(str(dtype).rsplit(".", 1)[-1])).eps) / 2


def gamma(n: int, dtype) -> float:
    """γ_n = n u / (1 − n u): relative bound of n roundings (an n-term sum or dot product)."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, (n, dtype)
    return nu / (1 - nu)


def leaves(xs) -> list[np.ndarray]:
    """The arrays of a nested list / tuple, as float64 NumPy arrays."""
    if isinstance(xs, (list, tuple)):
        return [leaf for x in xs for leaf in leaves(x)]
    return [np.asarray(xs, dtype=np.float64)]


def rounding_bounds(views, loss: float, grads, dtype, temperatures: tuple[float, float] = (0.1, 0.05)) -> tuple[float, float]:
    """Bounds on the absolute rounding error of a Self-Classifier loss computed in ``dtype`` and
    of each entry of its gradient: first order, from the logits ``views`` (arrays of shape
    ``(N, C)``, nested as heads and views in any way), the loss and its gradients ``grads`` (a
    float64 reference; any value within these bounds gives the same bounds to first order) and
    the (row, column) temperatures.

    With u the dtype's unit roundoff: every log-probability the loss is made of comes from
    max-shifted scaled logits s/τ in :data:`ROUNDINGS` = R roundings of quantities up to
    max|s|/τ (the core documents an error growing with |s|/τ · (dtype eps)), i.e. it is exact
    for logits moved by at most δ = R u max|s| (τ cancels); and every sum inside a log-sum-exp
    or a normalisation (at most N + C terms) adds a relative (N + C) u.

    - loss: δ ‖∇_s L‖₁ for each of the row and the column paths, plus (N + C) u (1 + |L|): a
      weighted mean of logs whose weights sum to at most 1 per row, each log off by (N + C) u
      absolute and each weight by (N + C) u relative.
    - gradient entry: a sum of products of at most 3 probabilities (over N τ); a shift of the
      scaled logits by κ = δ / τ_min moves each probability by a relative 2κ, each sum by
      (N + C) u, so the entry by 3 (2κ + (N + C) u) times the size of its terms, taken as the
      largest entry of the gradient.

    At |s|/τ = 2e5 in float32 (``self_classifier/test_closed_form.extreme_views``) the gradient bound reaches the gradient's
    own size: float32 promises nothing finer there; the moderate cases check the gradient.
    """
    u = unit_roundoff(dtype)
    xs, g = leaves(views), np.concatenate([x.ravel() for x in leaves(grads)])
    scale = max(float(np.abs(x).max()) for x in xs)
    terms = max(sum(x.shape) for x in xs)  # N + C
    delta = ROUNDINGS * u * scale
    loss_bound = 2 * delta * float(np.abs(g).sum()) + terms * u * (1 + abs(loss))
    kappa = delta / min(temperatures)
    grad_bound = 3 * (2 * kappa + terms * u) * float(np.abs(g).max())
    return loss_bound, grad_bound


def assert_within_rounding(loss, grads, ref_loss, ref_grads, views, dtype, temperatures=(0.1, 0.05), computations=2) -> None:
    """``loss`` and ``grads`` equal ``ref_loss`` and ``ref_grads`` to the rounding of
    ``computations`` computations in ``dtype`` (2: both computed in it; 1: the reference is
    exact, e.g. float64 against float32)."""
    loss_bound, grad_bound = rounding_bounds(views, float(ref_loss), ref_grads, dtype, temperatures)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=0, atol=computations * loss_bound)
    for g, r in zip(leaves(grads), leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=computations * grad_bound)


def probability_rtol(views, dtype, temperature: float) -> float:
    """Relative rounding bound of a Self-Classifier probability (a softmax of s/τ, L1-normalised
    along the other axis) computed in ``dtype`` from the logits ``views``: the scaled logits are
    exact for a shift of κ = R u max|s| / τ (as in :func:`rounding_bounds`), which moves a
    softmax entry by a relative 2κ; each of the two sums (at most N + C terms) adds (N + C) u.
    A log-probability is off by the same amount, absolutely."""
    u = unit_roundoff(dtype)
    xs = leaves(views)
    kappa = ROUNDINGS * u * max(float(np.abs(x).max()) for x in xs) / temperature
    return 2 * kappa + 2 * max(sum(x.shape) for x in xs) * u


def unit_norm_atol(dim: int, dtype) -> float:
    """|‖x / ‖x‖‖ − 1| of a ``dim``-vector normalised in ``dtype`` (its sum of squares γ_dim
    relative, the square root, a rescaling against under/overflow and the division u each,
    halved by the root at most) and measured again in ``dtype`` (γ_dim + u): γ_{2 dim + 4}."""
    return gamma(2 * dim + 4, dtype)


def running_sum_atol(additions: int, magnitude: float, dtype) -> float:
    """Drift of a sum kept up to date in ``dtype`` by ``additions`` additions or subtractions,
    its partial sums never larger than ``magnitude``: each rounds by u · magnitude at most."""
    return gamma(additions, dtype) * magnitude


def momentum_feature_atol(dim: int, momentum: float, updates: int, dtype, computations: int = 2) -> float:
    """Entry error of an ODC memory feature after ``updates`` momentum updates in ``dtype``
    (unit-norm ``dim``-vectors): each update normalises m·unit + (1 − m)·old, the unit vector
    and the old feature off by γ_{dim+2} each, the mix by 2u more, divided by ‖mix‖ ≥ |2m − 1|,
    and its own normalisation γ_{dim+2}: γ_{2 dim + 8} / |2m − 1|; the previous error is
    carried with weight r = (1 − m) / |2m − 1|, so after k updates Σ_{i<k} r^i of them."""
    r = (1 - momentum) / abs(2 * momentum - 1)
    carried = sum(r**i for i in range(max(updates, 1)))
    return computations * gamma(2 * dim + 8, dtype) / abs(2 * momentum - 1) * carried


def reweight_rtol(clusters: int, power: float, largest: int, dtype) -> float:
    """Relative bound of ODC's loss weights n^−p / Σ n^−p computed in log space in ``dtype``:
    p log n rounded (u p log n_max, in the numerator and in each term of the sum), the
    logsumexp of ``clusters`` terms γ_{C+2}, and exp one u."""
    return gamma(clusters + 3, dtype) + 2 * power * float(np.log(max(largest, 2))) * unit_roundoff(dtype)


def linear_head_bounds(inputs, weight, loss: float, logit_grads, dtype, temperatures=(0.1, 0.05), computations: int = 2):
    """Bounds for a Self-Classifier loss of logits s_v = x_v @ W computed ``computations`` times
    in ``dtype``, from the inputs x_v (N, D), W (D, C) (a bias: a row of W and a column of
    ones in x), the loss and its gradients w.r.t. the logits (a reference).

    Each logit is also off by γ_D (|x| @ |W|) from its product: that moves the loss by that
    times ‖∇_s L‖₁, and a gradient entry w.r.t. s by 6 κ max|∇_s L| (κ = that / τ_min, as in
    :func:`rounding_bounds`). ∂L/∂W = Σ_v x_vᵀ ∇_{s_v} L and ∂L/∂x_v = ∇_{s_v} L Wᵀ carry the
    ∇_s error times the column (row) 1-norms of x (W), and their own γ_{V N} (γ_C) sums.

    Returns (loss bound, bound on each entry of ∂L/∂W, [bound on each entry of ∂L/∂x_v]).
    """
    xs, w = leaves(inputs), np.asarray(weight, np.float64)
    g_s = leaves(logit_grads)
    logits = [x @ w for x in xs]
    loss_b, grad_b = rounding_bounds(logits, loss, g_s, dtype, temperatures)
    product = gamma(w.shape[0], dtype) * max(float((np.abs(x) @ np.abs(w)).max()) for x in xs)
    g_max = max(float(np.abs(g).max()) for g in g_s)
    loss_tol = computations * (loss_b + product * sum(float(np.abs(g).sum()) for g in g_s))
    gs_tol = computations * (grad_b + 6 * product / min(temperatures) * g_max)
    terms = sum(x.shape[0] for x in xs)
    w_tol = gs_tol * sum(float(np.abs(x).sum(axis=0).max()) for x in xs) + computations * gamma(terms, dtype) * float(
        sum(np.abs(x).T @ np.abs(g) for x, g in zip(xs, g_s)).max()
    )
    x_tols = [
        gs_tol * float(np.abs(w).sum(axis=1).max()) + computations * gamma(w.shape[1], dtype) * float((np.abs(g) @ np.abs(w).T).max())
        for g in g_s
    ]
    return loss_tol, w_tol, x_tols


def distance_atol(x: np.ndarray, centred: bool = True, dtype=np.float32) -> np.ndarray:
    """(N,) bounds on a squared distance from each row of ``x`` to any centroid (a mean of rows
    or a row: inside their convex hull) computed in ``dtype`` as ‖x‖² − 2 x·c + ‖c‖²: the
    D-term sums and two additions γ_{D+4} (‖x‖ + ‖c‖)², of the data centred on their mean
    (``centred``: the array backend) or not (faiss); centring and the float32 centroids move
    each coordinate by u (|x| + |c|), the distance by 2 ‖x − c‖ times that."""
    x = x.astype(np.float64)
    a = np.linalg.norm(x, axis=1)
    r = np.linalg.norm(x - x.mean(axis=0), axis=1) if centred else a
    reach = r + r.max()
    return gamma(x.shape[1] + 4, dtype) * reach**2 + 4 * reach * unit_roundoff(dtype) * (a + a.max())


def inertia_atol(x: np.ndarray, inertia: float, centred: bool = True, dtype=np.float32) -> float:
    """Bound on an inertia: the distances' bounds and the N-term sum's γ_N (in ``dtype`` at worst)."""
    return float(distance_atol(x, centred, dtype).sum()) + gamma(x.shape[0], dtype) * inertia


PCA_EPS = 1e-5  # PCAWhitening's default relative eps


def whitening_bounds(x: np.ndarray, dim: int, acc, out=np.float32) -> dict[str, float]:
    """Error bounds of the whitening of ``x`` (n, d) of dtype ``out`` fitted with an accumulator
    dtype ``acc``, from its float64 covariance C (eigenvalues λ₁ ≥ … ≥ λ_d):

    - fit: the covariance accumulated in ``acc`` is off by d γ_{n+2} λ₁ in norm (entries
      γ_{n+2} √(C_kk C_ll)), ``eigh`` is backward stable (γ_{d²} λ₁ taken for its constant):
      C + E is whitened exactly, ‖E‖ = pert;
    - whitened covariance: W C Wᵀ = diag(λ / (λ + eps λ₁)) − W E Wᵀ: eps κ + pert / λ_dim
      (κ = λ₁ / λ_dim), plus the output's own rounding (see ``z_rel``) twice;
    - z = (x − μ) W: each entry relative z_rel = u(out) + γ_d(acc) √(d κ_all) (the product's terms
      are up to √(tr C / λ_dim) times the result); the mean μ off by γ_{n+2} max|x|, moving
      every z by that times ‖W‖ = λ_dim^{-1/2} √d;
    - a second fit on perturbed data (another backend, a scaled copy: 2 u relative on C) moves
      the whitening W by pert' (1 / gap + 1 / λ_dim), gap the smallest eigenvalue gap among
      the first dim + 1 (Davis–Kahan): ``refit`` bounds the unit output rows' entries.
    """
    n, d = x.shape
    x64 = x.astype(np.float64)
    xc = x64 - x64.mean(axis=0)
    lam = np.linalg.eigvalsh(xc.T @ xc / n)[::-1]
    kappa, kappa_all = lam[0] / lam[dim - 1], lam.sum() / lam[dim - 1]
    pert = (d * gamma(n + 2, acc) + gamma(d * d, acc)) * lam[0]
    z_rel = unit_roundoff(out) + gamma(d, acc) * np.sqrt(d * kappa_all)
    gaps = -np.diff(lam[: min(dim + 1, d)])
    gap = gaps.min() if gaps.size else np.inf
    pert2 = pert + (d * gamma(n + 2, np.float64) + gamma(d * d, np.float64) + 2 * unit_roundoff(out)) * lam[0]
    refit = 2 * np.sqrt(kappa_all) * pert2 * (1 / gap + 1 / lam[dim - 1]) + 2 * z_rel
    mean_shift = gamma(n + 2, acc) * np.abs(x64).max() * np.sqrt(d / lam[dim - 1])
    return {
        "cov": PCA_EPS * kappa + pert / lam[dim - 1] + 3 * z_rel,
        "z_rel": z_rel,
        "mean": mean_shift + z_rel * np.sqrt(kappa_all),
        "refit": refit,
    }


def identical_partitions_nmi_rtol(classes: int) -> float:
    """Relative bound of scikit-learn's NMI (float64) of two partitions into ``classes`` classes
    that are equal up to renaming: the mutual information and both entropies are sums of
    ``classes`` non-negative terms −p log p (no cancellation), each term off by 4 u, each sum
    by γ_classes more; their ratio adds 2 u: γ_{2 classes + 12} covers both sides."""
    return gamma(2 * classes + 12, np.float64)
