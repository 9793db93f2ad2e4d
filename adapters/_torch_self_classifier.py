"""Self-Classifier loss for PyTorch with a closed-form backward (``torch.autograd.Function``).

Same value as :func:`clusterlearn.self_classifier.self_classifier_loss` (same formula, same
``eps`` and ``max(sum, eps)`` clamps, same pairs of views, same mean over heads, same choice
between the linear-space and log-space arithmetic), but the gradient is written out instead of
being recorded op by op by autograd, and the views of one head are processed as one stacked
``(K, N, C)`` tensor: about 20 passes over ``K·N·C`` forward and 11 backward (plus one for
the finiteness check), where autograd through the core records about 100. Cross-entropy
takes about 5, so eager PyTorch stays above 2× its time. On CPU tensors the loss therefore
runs, by default, the fused C++ kernel (:class:`FusedSelfClassifierFunction`, built by
:mod:`._native`): four passes over the logits in all, 1.1–2.3× cross-entropy (see
``benchmarks/self_classifier.py``); :class:`SelfClassifierFunction` serves GPU tensors, the
log-space cases and ``kernel="array"``.

Gradient
--------
For one head with views ``x_v`` (``N × C``), ``P`` ordered pairs ``(i, j)`` (target view ``i``,
prediction view ``j``) and ``n`` loss rows ``R`` (this process's rows of the global batch)::

    L = −1/(P n) Σ_v Σ_{n∈R} Σ_y T_v[n, y] · A_v[n, y],    A_v = Σ_{j:(v,j)} LP_j,  B_v = Σ_{i:(i,v)} T_i

Targets, ``z = x/τ_col``: ``p = softmax_dim0(z)``, ``S_n = Σ_y p[n, y]``, ``T = p / max(S, eps)``
(rows ``R``), ``a_n = [S_n > eps]`` (1 without the clamp). With ``G_T = ∂L/∂T``::

    U = T ⊙ (G_T − a ⊙ Σ_y G_T T)           ∂L/∂z = U − p ⊙ Σ_n U

Predictions, ``ζ = x/τ_row``: ``q = softmax_dim1(ζ)``, ``Q_y = max(Σ_n q[n, y], eps)``,
``w = (N/C) q / Q``, ``LP = log(w + eps)``, ``π = w / (w + eps)``, ``b_y = [Σ_n q > eps]``.
With ``G = ∂L/∂LP``::

    V = π ⊙ G − (q / Q) ⊙ b ⊙ Σ_n π G        ∂L/∂ζ = V − q ⊙ Σ_y V

Every factor is bounded (``T, p, q, π, q/Q ∈ [0, 1]``, ``|LP| <= max(−log eps, log(N/C + eps))``),
so the gradient is finite for logits of any finite magnitude, and ``G_T = −A/(P n)`` and
``G = −B/(P n)``. The sum ``Σ_y A T`` of the target term is also the loss, so the forward
pass computes it once for both. In log space (``clamp_sums=False`` or an ``eps`` the dtype
cannot resolve, as in the core) ``T``, ``q / Q`` and ``π = exp(log w − LP)`` are formed from
log-softmaxes; the backward is the same.

Memory: the forward saves ``p, T, q, π`` and ``A`` (five ``K·N·C`` tensors; one more, ``q / Q``,
in log space) for the backward; autograd frees them after it (unless ``retain_graph=True``).
Double backward is not supported.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from clusterlearn.backend import namespace
from clusterlearn.self_classifier import (
    Gather,
    _as_float,
    _call_argument,
    _check_finite,
    _check_head,
    _check_positive,
    _parse,
    _prepare,
    _scaled,
    view_pairs,
)

from . import _native
from ._torch_distributed import agree, all_gather_with_grad, describe, first_error, gather_agreed, world_size

__all__ = ["FusedSelfClassifierFunction", "SelfClassifierFunction", "SelfClassifierLoss", "self_classifier_head_loss"]



class _Config(NamedTuple):
    """Static parameters of one head's loss (validated by the caller)."""

    row_temperature: float
    col_temperature: float
    eps: float
    clamp_sums: bool
    rows: slice | None  # loss rows within the global batch; None: all
    pairs: tuple[tuple[int, int], ...]  # (target view, prediction view)


def _tiny(dtype: torch.dtype) -> float:
    """8 × the smallest normal number of ``dtype`` (the core's ``exp`` floor)."""
    return 8.0 * torch.finfo(dtype).tiny


def _linear_targets(dtype: torch.dtype, n_classes: int, cfg: _Config) -> bool:
    """The core's condition for computing clamped targets as ``p / max(Σ p, eps)`` directly."""
    resolution = torch.finfo(dtype).eps / 1024
    return cfg.clamp_sums and n_classes * _tiny(dtype) / cfg.eps <= resolution


def _linear_predictions(dtype: torch.dtype, n: int, n_classes: int, cfg: _Config) -> bool:
    """The core's condition for computing clamped ``log((N/C)·q/max(Σq, eps) + eps)`` directly."""
    tiny, resolution = _tiny(dtype), torch.finfo(dtype).eps / 16
    return (
        cfg.clamp_sums
        and (n / n_classes) * tiny / cfg.eps / cfg.eps <= resolution
        and n * tiny / cfg.eps <= resolution
    )


def _softmax(views: Sequence[torch.Tensor], dim: int, temperature: float, floor: float) -> torch.Tensor:
    """``softmax(x_v / temperature, dim)`` of every view, stacked to ``(K, N, C)``; ``exp`` floored.

    ``(x − max) / τ`` is clamped at ``log floor`` (<< 1) before ``exp``, so that no ``exp``
    underflows to a denormal number (slow on CPUs); the floor is negligible by the callers'
    guards. The views are written straight into the stacked buffer (no separate stack copy).
    """
    e = views[0].new_empty((len(views), *views[0].shape))
    for v, x in enumerate(views):
        torch.sub(x, x.amax(dim=dim, keepdim=True), out=e[v])
    e.mul_(1.0 / temperature).clamp_min_(math.log(floor)).exp_()
    return e.div_(e.sum(dim=dim + 1, keepdim=True))


def _combine(x: torch.Tensor, sources: Sequence[Sequence[int]]) -> torch.Tensor:
    """``out[i] = Σ_{j ∈ sources[i]} x[j]`` for ``x`` of shape ``(K, ...)`` (one pass over ``x``)."""
    mix = torch.zeros((len(sources), x.shape[0]), dtype=x.dtype, device=x.device)
    for i, js in enumerate(sources):
        mix[i, list(js)] = 1.0
    return (mix @ x.reshape(x.shape[0], -1)).reshape((len(sources), *x.shape[1:]))


def _sources(pairs: Sequence[tuple[int, int]], num_views: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prediction views paired with each target view, and target views paired with each prediction view."""
    to_pred = [[j for i, j in pairs if i == v] for v in range(num_views)]
    to_target = [[i for i, j in pairs if j == v] for v in range(num_views)]
    return to_pred, to_target


class SelfClassifierFunction(torch.autograd.Function):
    """Loss of one head from its global logits, with the closed-form gradient.

    ``SelfClassifierFunction.apply(cfg, x_0, ..., x_{K−1})`` with a :class:`_Config` and ``K >= 2``
    views of shape ``(N, C)`` (the same ``N`` samples, one float32 or float64 dtype, finite)
    returns the 0-d mean over ``cfg.pairs`` of the pair terms, each averaged over the rows
    ``cfg.rows``; its backward returns the ``(N, C)`` gradient of every view (views of one
    ``(K, N, C)`` tensor). Use :func:`self_classifier_head_loss` or :class:`SelfClassifierLoss`,
    which validate.
    """

    @staticmethod
    def forward(ctx: Any, cfg: _Config, *views: torch.Tensor) -> torch.Tensor:  # noqa: D102
        k = len(views)
        n_global, n_classes = views[0].shape
        dtype = views[0].dtype
        rows = cfg.rows if cfg.rows is not None else slice(None)
        to_pred, to_target = _sources(cfg.pairs, k)
        log_eps = math.log(cfg.eps)
        stacked = None if _linear_targets(dtype, n_classes, cfg) and _linear_predictions(
            dtype, n_global, n_classes, cfg
        ) else torch.stack(views)
        xp = None if stacked is None else namespace(logits=stacked)
        with torch.no_grad():
            # Targets T (loss rows) and the column softmax p (all rows).
            if stacked is None or _linear_targets(dtype, n_classes, cfg):
                p = _softmax(views, 0, cfg.col_temperature, _native.exp_floors(torch.finfo(dtype), n_global, n_classes, cfg.eps)[0])
                row_sum = p[:, rows].sum(dim=2, keepdim=True)
                target = p[:, rows] / row_sum.clamp_min(cfg.eps)
                active_t = row_sum > cfg.eps
            else:
                log_p = torch.log_softmax(_scaled(stacked, 1, cfg.col_temperature, xp), dim=1)
                target = torch.softmax(log_p[:, rows], dim=2)  # exp(log p − m) / Σ, m = row max
                if cfg.clamp_sums:
                    # p / max(S, eps) = softmax · exp(min(log S − log eps, 0))
                    excess = torch.logsumexp(log_p[:, rows], dim=2, keepdim=True) - log_eps
                    target.mul_(excess.clamp_max(0.0).exp_())
                    active_t = excess > 0
                else:
                    active_t = None
                p = log_p.exp_()

            # Predictions LP = log((N/C)·pred + eps) (loss rows), π = w / (w + eps), the row
            # softmax q and q/Q = rho * rho_scale (all rows).
            ratio = n_global / n_classes
            if stacked is None or _linear_predictions(dtype, n_global, n_classes, cfg):
                floor = _native.exp_floors(torch.finfo(dtype), n_global, n_classes, cfg.eps)[1]
                q = _softmax(views, 1, cfg.row_temperature, floor)
                col_sum = q.sum(dim=1, keepdim=True)
                inv_norm = col_sum.clamp_min(cfg.eps).reciprocal_()
                w = q[:, rows] * (inv_norm * ratio)
                w_eps = w + cfg.eps
                rho, rho_scale = q, inv_norm.mul_(col_sum > cfg.eps)
            else:
                log_q = torch.log_softmax(_scaled(stacked, 2, cfg.row_temperature, xp), dim=2)
                log_norm = torch.logsumexp(log_q, dim=1, keepdim=True)
                rho_scale = None
                if cfg.clamp_sums:
                    rho_scale = (log_norm > log_eps).to(dtype)
                    log_norm.clamp_min_(log_eps)
                rho = (log_q - log_norm).exp_()  # q / Q
                log_w = (log_q[:, rows] - log_norm).add_(math.log(ratio))
                w_eps = None
                q = log_q.exp_()
            # A_v = Σ_j LP_j over the prediction views j paired with target view v.
            single = all(len(js) == 1 for js in to_pred)
            if w_eps is not None and single:
                acc = torch.empty_like(w_eps)
                for v, (j,) in enumerate(to_pred):
                    torch.log(w_eps[j], out=acc[v])
                pi = w.div_(w_eps)
            elif w_eps is not None:
                acc = _combine(torch.log(w_eps), to_pred)
                pi = w.div_(w_eps)
            else:
                log_pred = torch.logaddexp(log_w, torch.tensor(log_eps, dtype=dtype, device=log_w.device))
                acc = _combine(log_pred, to_pred)
                pi = log_w.sub_(log_pred).exp_()
            del w_eps
            dots = torch.linalg.vecdot(target, acc, dim=2)  # Σ_y T_v A_v: the loss, and r of the backward
            loss = dots.sum() * (-1.0 / (len(cfg.pairs) * target.shape[1]))

        ctx.cfg, ctx.n_loss, ctx.to_target = cfg, target.shape[1], to_target
        ctx.save_for_backward(p, target, active_t, q, rho, rho_scale, pi, acc, dots)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        cfg = ctx.cfg
        p, target, active_t, q, rho, rho_scale, pi, acc, dots = ctx.saved_tensors
        whole = cfg.rows is None
        # grad_x = −g/(P n) · [(U − p Σ_n U)/τ_col + (V − q Σ_y V)/τ_row], with G_T = −A/(P n) and
        # G = −B/(P n) factored out: U = T ⊙ (A − a·Σ_y A T), V = π ⊙ B − (q/Q) ⊙ b·Σ_n π B.
        r = dots.unsqueeze(2) if active_t is None else dots.unsqueeze(2) * active_t
        u = torch.sub(acc, r).mul_(target)
        del acc, r
        col = u.sum(dim=1, keepdim=True)
        if whole:
            d_col = u.addcmul_(p, col, value=-1.0)
        else:
            d_col = torch.mul(p, col).neg_()
            d_col[:, cfg.rows] += u
        del u, p, col

        if all(len(i) == 1 for i in ctx.to_target):  # π ⊙ B, B_v = Σ_i T_i
            v_loc = torch.empty_like(pi)
            for v, (i,) in enumerate(ctx.to_target):
                torch.mul(pi[v], target[i], out=v_loc[v])
        else:
            v_loc = _combine(target, ctx.to_target).mul_(pi)
        del target, pi
        c = v_loc.sum(dim=1, keepdim=True)
        if rho_scale is not None:
            c.mul_(rho_scale)
        if whole:
            v_full = v_loc.addcmul_(rho, c, value=-1.0)
        else:
            v_full = torch.mul(rho, c).neg_()
            v_full[:, cfg.rows] += v_loc
        del v_loc, rho, c
        d_row = v_full.addcmul_(q, v_full.sum(dim=2, keepdim=True), value=-1.0)
        del q

        d_col.add_(d_row, alpha=cfg.col_temperature / cfg.row_temperature)
        d_col.mul_(grad * (-1.0 / (len(cfg.pairs) * ctx.n_loss * cfg.col_temperature)))
        return (None, *d_col.unbind(0))


class FusedSelfClassifierFunction(torch.autograd.Function):
    """:class:`SelfClassifierFunction` computed by the fused CPU kernel (:mod:`._native`).

    ``apply(cfg, names, gradient, *views)``: :class:`SelfClassifierFunction`'s arguments,
    value and gradient (the linear-space path only, contiguous rows: CPU tensors, float32 or
    float64, both guards of :func:`_linear_targets` and :func:`_linear_predictions`). The
    forward makes three passes over the logits, keeps ``(K, N)`` and ``(K, C)`` statistics and,
    when a gradient is wanted, writes the gradient's row-local part into a ``(K, N, C)``
    buffer (and, while ``2 K N C`` values fit in :data:`._native.CACHE_BYTES`, keeps its
    exponentials for reuse); the backward makes one more pass and turns that buffer into the
    gradient in place.
    A second backward through the same graph (``retain_graph=True``) runs the forward again to
    rebuild it; ``gradient=False`` (no grad mode, or no view requires grad) skips the buffer.
    With ``names`` (not None) non-finite logits raise ValueError naming the view
    (the kernel finds them in its first pass); without, they give a NaN loss and gradient.
    Runs on ``torch.get_num_threads()`` threads of PyTorch's OpenMP pool.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any, cfg: _Config, names: Sequence[str] | None, gradient: bool, *views: torch.Tensor
    ) -> torch.Tensor:
        views = tuple(x.detach().contiguous() for x in views)
        k, (n, c), dtype = len(views), views[0].shape, views[0].dtype
        rows = cfg.rows.indices(n)[:2] if cfg.rows is not None else (0, n)
        floor_t, floor_p = _native.exp_floors(torch.finfo(dtype), n, c, cfg.eps)
        ctx.params = _native.params(
            k, n, c, rows, cfg.pairs,
            row_temperature=cfg.row_temperature,
            col_temperature=cfg.col_temperature,
            log_floor_t=math.log(floor_t),
            log_floor_p=math.log(floor_p),
            eps=cfg.eps,
            threads=torch.get_num_threads(),
        )
        ctx.suffix = "f32" if dtype == torch.float32 else "f64"
        ctx.scale = -1.0 / (len(cfg.pairs) * (rows[1] - rows[0]) * cfg.col_temperature)
        stats, g0, cache, loss = FusedSelfClassifierFunction._run(ctx, views, gradient)
        if names is not None and math.isnan(loss):  # the kernel's flags: the last k statistics
            bad = next(v for v in range(k) if float(stats[v - k]) != 0.0)
            raise ValueError(f"{names[bad]} contains non-finite values (NaN or inf)")
        ctx.g0, ctx.cache, ctx.consumed = g0, cache, False
        ctx.save_for_backward(stats, *views)
        return views[0].new_tensor(loss)

    @staticmethod
    def _run(ctx: Any, views: Sequence[torch.Tensor], gradient: bool) -> tuple[Any, ...]:
        """The kernel's forward: statistics, the gradient's row-local part (if wanted), the
        exponentials' cache (small problems), the loss."""
        lib = _native.kernel()
        k, (n, c) = len(views), views[0].shape
        stats = views[0].new_empty(lib.sc_stats_size(k, n, c))
        g0 = views[0].new_empty((k, n, c)) if gradient else None
        size = _native.cache_size(k, n, c, views[0].element_size())
        cache = views[0].new_empty(size) if size else None
        loss = getattr(lib, f"sc_forward_{ctx.suffix}")(
            _native.pointers([x.data_ptr() for x in views]),
            ctx.params,
            stats.data_ptr(),
            None if g0 is None else _native.pointers([g.data_ptr() for g in g0.unbind(0)]),
            None if cache is None else cache.data_ptr(),
        )
        return stats, g0, cache, loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        stats, *views = ctx.saved_tensors
        g0, cache = ctx.g0, ctx.cache
        if ctx.consumed:  # retain_graph: the first backward turned g0 into its gradient
            stats, g0, cache, _ = FusedSelfClassifierFunction._run(ctx, views, True)
        ctx.consumed = True
        g0_ptrs = _native.pointers([g.data_ptr() for g in g0.unbind(0)])
        getattr(_native.kernel(), f"sc_finish_{ctx.suffix}")(
            _native.pointers([x.data_ptr() for x in views]),
            ctx.params,
            stats.data_ptr(),
            float(grad) * ctx.scale,
            g0_ptrs,
            g0_ptrs,
            None if cache is None else cache.data_ptr(),
        )
        return (None, None, None, *g0.unbind(0))


def _fused_unavailable(views: Sequence[torch.Tensor], cfg: _Config) -> str | None:
    """Why the fused kernel cannot compute this head (``None``: it can)."""
    n, c = views[0].shape
    dtype = views[0].dtype
    if views[0].device.type != "cpu":
        return f"the logits are on {views[0].device}, the kernel runs on the CPU"
    if cfg.rows is not None and cfg.rows.indices(n)[2] != 1:
        return f"the kernel takes contiguous loss rows, got rows={cfg.rows}"
    if dtype not in (torch.float32, torch.float64):
        return f"the kernel computes in float32 or float64, the logits are {dtype}"
    if not (_linear_targets(dtype, c, cfg) and _linear_predictions(dtype, n, c, cfg)):
        return _native.LOG_SPACE
    if _native.kernel() is None:
        return _native.NOT_BUILT
    return None


def self_classifier_head_loss(
    logits: torch.Tensor | Sequence[torch.Tensor],
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    clamp_sums: bool = True,
    rows: slice | None = None,
    kernel: str = "auto",
    finite_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Loss of one head from its global logits, with the closed-form backward.

    Parameters
    ----------
    logits : tensor of shape (K, N, C), or a sequence of K tensors of shape (N, C)
        ``K >= 2`` views (0, 1 global, 2.. local) of the same ``N`` samples, real floating
        (half precision is computed in float32), finite (checked only with ``finite_names``).
        A sequence is stacked (its backward is free: the gradient is split back into views of
        one tensor).
    row_temperature, col_temperature, eps, clamp_sums
        As in :class:`clusterlearn.self_classifier.SelfClassifierLoss`.
    rows : slice, optional
        This process's rows of a gathered global batch: the targets and predictions use all
        ``N`` rows (``N/C`` with the global ``N``), the pair terms average over these rows.
    kernel : {"auto", "fused", "array"}, default "auto"
        ``"fused"``: :class:`FusedSelfClassifierFunction` (raises ValueError where it does not
        apply, with the reason); ``"array"``: :class:`SelfClassifierFunction`; ``"auto"``: the
        fused kernel where it applies.
    finite_names : sequence of str, optional
        The views' names: raise ValueError naming the first view that holds NaN or inf (the
        fused kernel checks during its first pass, for free). ``None``: not checked.

    Returns
    -------
    0-d tensor, dtype of the (float32-promoted) logits
        Mean over the ``4K − 6`` pairs of :func:`clusterlearn.self_classifier.view_pairs`;
        equal to the core's loss of this head.
    """
    views = list(logits.unbind(0) if isinstance(logits, torch.Tensor) and logits.ndim == 3 else logits)
    xp = _check_head(views, rows)
    dtype = functools.reduce(torch.promote_types, [x.dtype for x in views])
    views = [_as_float(x.to(dtype), xp) for x in views]
    n = views[0].shape[0]
    cfg = _Config(
        _check_positive("row_temperature", row_temperature),
        _check_positive("col_temperature", col_temperature),
        _check_positive("eps", eps),
        bool(clamp_sums),
        None if rows is None or rows.indices(n) == slice(None).indices(n) else rows,
        view_pairs(len(views)),
    )
    if _native.use_fused(kernel, lambda: _fused_unavailable(views, cfg)):
        gradient = torch.is_grad_enabled() and any(x.requires_grad for x in views)
        return FusedSelfClassifierFunction.apply(cfg, finite_names, gradient, *views)
    for name, x in zip(finite_names or (), views):
        _check_finite(name, x, xp)
    return SelfClassifierFunction.apply(cfg, *views)


class SelfClassifierLoss(torch.nn.Module):
    """Self-Classifier loss module with the closed-form backward; same value as the core's.

    Parameters
    ----------
    row_temperature : float, default 0.1
        ``τ_row > 0`` of the row softmax ``p(y|x)`` (predictions).
    col_temperature : float, default 0.05
        ``τ_col > 0`` of the column softmax ``p(x|y)`` (targets).
    eps : float, default 1e-12
        ``eps > 0`` inside ``log((N/C)·pred + eps)`` and (``clamp_sums``) the sums' floor.
    clamp_sums : bool, default True
        Divide the L1 normalisations by ``max(sum, eps)`` (the reference) or the exact sums.
    check_finite : bool, default True
        Raise ValueError on NaN/inf in the (gathered) logits (one pass and a device sync).
    gather : "auto", None or callable, default "auto"
        ``None``: the local batch only. A callable with the core's contract
        ``gather(local (n, C)) -> (global (N, C), rows slice)`` whose backward sums the
        gradient over processes. ``"auto"``: :func:`clusterlearn.adapters._torch_distributed.all_gather_with_grad`
        when ``torch.distributed`` is initialised with more than one process (decided at each
        call), else none. The loss is computed on the global logits, averaged over this
        process's rows, and its gradient flows back through the gather to the local logits.
        With ``all_gather_with_grad`` (also as ``"auto"``) every rank first checks its own
        call and compares its layout (number of heads and views; per view the shape, dtype,
        device type and whether it records the gradient) with rank 0's: any exception, or
        any difference, raises on every rank before the first gather. Views of one head with
        different dtypes are computed in their promoted dtype, as in the core.
    kernel : {"auto", "fused", "array"}, default "auto"
        ``"auto"``: the fused CPU kernel (:class:`FusedSelfClassifierFunction`, built with the
        system's C++ compiler on first use) where it applies (CPU float32/float64 logits, the
        linear-space arithmetic), else :class:`SelfClassifierFunction`. ``"fused"``: always the
        kernel (ValueError with the reason where it does not apply). ``"array"``: never.

    Notes
    -----
    Call as ``criterion(v1, v2)``, ``criterion(v0, v1, v2, ...)``, ``criterion([v0, v1, ...])``
    or ``criterion([[h0v0, h0v1, ...], [h1v0, h1v1, ...]])`` with torch tensors of shape
    ``(N, C)`` (``C`` may differ between heads); the result is the 0-d mean over heads and view
    pairs, as :class:`clusterlearn.self_classifier.SelfClassifierLoss`, and raises the same
    errors on bad input. Each head runs the fused kernel or :class:`SelfClassifierFunction` once
    on its views.
    """

    def __init__(
        self,
        row_temperature: float = 0.1,
        col_temperature: float = 0.05,
        eps: float = 1e-12,
        *,
        clamp_sums: bool = True,
        check_finite: bool = True,
        gather: Gather | str | None = "auto",
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.kernel = _native.check_kernel(kernel)
        self.row_temperature = _check_positive("row_temperature", row_temperature)
        self.col_temperature = _check_positive("col_temperature", col_temperature)
        self.eps = _check_positive("eps", eps)
        if not (gather is None or gather == "auto" or callable(gather)):
            raise TypeError(f"gather must be 'auto', None or a callable, got {gather!r}")
        self.gather = gather
        self.clamp_sums = bool(clamp_sums)
        self.check_finite = bool(check_finite)

    def _gather(self) -> Gather | None:
        if self.gather == "auto":
            return all_gather_with_grad if world_size() > 1 else None
        return self.gather  # type: ignore[return-value]

    def forward(self, *logits: Any) -> torch.Tensor:
        """``criterion(s1, s2, ...)``, ``criterion([views])`` or ``criterion([[head views], ...])``."""
        gather = self._gather()
        if gather is all_gather_with_grad:
            settings = {
                "row_temperature": self.row_temperature,
                "col_temperature": self.col_temperature,
                "eps": self.eps,
                "clamp_sums": self.clamp_sums,
            }
            heads, names = _agree_on_layout(logits, settings)
            gather = gather_agreed
        else:
            heads, names = _parse_torch(logits)
        _, prepared = _prepare(heads, names, gather, check_finite=False)  # checked per head below
        total = None
        for (full, rows), labels in zip(prepared, names):
            if gather is not None:
                labels = [f"gather({name})" for name in labels]
            term = self_classifier_head_loss(
                full,
                row_temperature=self.row_temperature,
                col_temperature=self.col_temperature,
                eps=self.eps,
                clamp_sums=self.clamp_sums,
                rows=rows,
                kernel=self.kernel,
                finite_names=labels if self.check_finite else None,
            )
            total = term if total is None else total + term
        return total / len(heads)

    def extra_repr(self) -> str:  # noqa: D102
        gather = self.gather if isinstance(self.gather, str) or self.gather is None else getattr(
            self.gather, "__name__", repr(self.gather)
        )
        return (
            f"row_temperature={self.row_temperature}, col_temperature={self.col_temperature}, "
            f"eps={self.eps}, clamp_sums={self.clamp_sums}, check_finite={self.check_finite}, "
            f"gather={gather!r}, kernel={self.kernel!r}"
        )


def _parse_torch(logits: tuple[Any, ...]) -> tuple[list[list[torch.Tensor]], list[list[str]]]:
    """The heads of views and their names from a call's arguments; TypeError unless torch tensors."""
    heads, names = _parse(_call_argument(logits))
    xp = namespace(**{names[h][v]: x for h, views in enumerate(heads) for v, x in enumerate(views)})
    if not all(isinstance(x, torch.Tensor) for views in heads for x in views):
        raise TypeError(f"SelfClassifierLoss (torch) needs torch tensors, got {xp.__name__} arrays")
    return heads, names


def _agree_on_layout(
    logits: tuple[Any, ...], settings: dict[str, Any]
) -> tuple[list[list[torch.Tensor]], list[list[str]]]:
    """Parse and check this rank's heads, then compare their layout and ``settings`` across ranks.

    Before the first gather, so that a rank whose call fails (any exception), or whose logits
    differ from rank 0's in number, shape, dtype, device type or in recording the gradient,
    or whose loss has other settings (temperatures, ``eps``), makes every rank raise instead
    of leaving the others waiting in a collective (or receiving bytes of another layout).
    Afterwards the views are gathered with :func:`gather_agreed` (no header of their own).
    """

    def parse_and_describe() -> tuple[Any, list[Any], list[str]]:
        heads, names = _parse_torch(logits)
        for views in heads:
            _check_head(views, slice(None))
        header: list[Any] = [*settings.values(), len(heads), [len(views) for views in heads]]
        labels: list[str] = [*settings, "number of heads", "views per head"]
        grad = torch.is_grad_enabled()
        for views, view_names in zip(heads, names):
            for x, name in zip(views, view_names):
                entries, entry_names = describe(name, x)
                header += [*entries, grad and x.requires_grad]
                labels += [*entry_names, f"{name} requires grad"]
        return (heads, names), header, labels

    described, err = first_error(parse_and_describe)
    parsed, header, labels = described if err is None else (None, [], [])
    agree(header, err, what="SelfClassifierLoss", names=labels)
    return parsed
