"""Self-Classifier loss for PyTorch: the core's closed form or the fused kernel, one head at a time.

Same value as :func:`clusterlearn.self_classifier.self_classifier_loss` (same formula, clamps,
pairs of views, mean over heads), with the gradient in closed form instead of recorded op by op
by autograd (about 100 full-size passes). Each head is computed by one of two executors of the
same :class:`~clusterlearn.self_classifier_guards.GuardPlan`:

- :class:`FusedSelfClassifierFunction`: the fused C++ kernel (:mod:`._native`), four passes over
  the logits in all; the default on CPU tensors where the plan is linear-space;
- :class:`SelfClassifierFunction`: the core's closed form
  (:func:`clusterlearn.self_classifier_closed_form.forward` / ``backward``, where the gradient is
  derived) in torch ops; GPU tensors, the log-space cases and ``kernel="array"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from clusterlearn import self_classifier_closed_form as closed_form
from clusterlearn.self_classifier import SelfClassifierLoss as CoreSelfClassifierLoss
from clusterlearn.self_classifier import head_plan
from clusterlearn.self_classifier_guards import GuardPlan
from clusterlearn.self_classifier_inputs import (
    Gather,
    call_argument,
    check_finite_logits,
    check_gather,
    check_head,
    parse_logits,
    prepare_heads,
)
from clusterlearn.backend import namespace

from . import _native
from ._torch_distributed import agree, all_gather_with_grad, describe, first_error, gather_agreed, world_size

__all__ = ["FusedSelfClassifierFunction", "SelfClassifierFunction", "SelfClassifierLoss", "self_classifier_head_loss"]


class SelfClassifierFunction(torch.autograd.Function):
    """Loss of one head from its global logits by the core's closed form.

    ``SelfClassifierFunction.apply(plan, x_0, ..., x_{K−1})`` with a
    :class:`~clusterlearn.self_classifier_guards.GuardPlan` and ``K >= 2`` views of shape
    ``(N, C)`` (one float32 or float64 dtype, finite) returns the 0-d mean over ``plan.pairs`` of
    the pair terms, each averaged over ``plan.rows``; its backward returns the ``(N, C)``
    gradient of every view. The forward saves the closed form's residuals (six ``K·N·C``
    tensors); double backward is not supported. Use :func:`self_classifier_head_loss` or
    :class:`SelfClassifierLoss`, which validate.
    """

    @staticmethod
    def forward(ctx: Any, plan: GuardPlan, *views: torch.Tensor) -> torch.Tensor:  # noqa: D102
        loss, residuals = closed_form.forward(plan, torch.stack(views), inplace=True)
        ctx.plan = plan
        ctx.save_for_backward(*residuals)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        return (None, *closed_form.backward(ctx.plan, ctx.saved_tensors, grad).unbind(0))


class FusedSelfClassifierFunction(torch.autograd.Function):
    """:class:`SelfClassifierFunction` computed by the fused CPU kernel (:mod:`._native`).

    ``apply(plan, names, gradient, *views)``: :class:`SelfClassifierFunction`'s arguments,
    value and gradient (a linear-space plan, contiguous rows: CPU tensors, float32 or float64). The
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
        ctx: Any, plan: GuardPlan, names: Sequence[str] | None, gradient: bool, *views: torch.Tensor
    ) -> torch.Tensor:
        views = tuple(x.detach().contiguous() for x in views)
        k = len(views)
        ctx.params = _native.params(plan, k, threads=torch.get_num_threads())
        ctx.suffix = "f32" if views[0].dtype == torch.float32 else "f64"
        ctx.scale = _native.gradient_scale(plan)
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
    views, plan = head_plan(
        list(logits.unbind(0) if isinstance(logits, torch.Tensor) and logits.ndim == 3 else logits), rows,
        row_temperature=row_temperature, col_temperature=col_temperature, eps=eps, clamp_sums=clamp_sums,
    )
    device = views[0].device
    elsewhere = None if device.type == "cpu" else f"the logits are on {device}"
    if _native.use_fused(kernel, lambda: _native.unavailable(plan, elsewhere, views[0].dtype, _native.kernel)):
        gradient = torch.is_grad_enabled() and any(x.requires_grad for x in views)
        return FusedSelfClassifierFunction.apply(plan, finite_names, gradient, *views)
    for name, x in zip(finite_names or (), views):
        check_finite_logits(name, x, namespace(logits=x))
    return SelfClassifierFunction.apply(plan, *views)


class SelfClassifierLoss(torch.nn.Module, CoreSelfClassifierLoss):
    """The core's :class:`~clusterlearn.SelfClassifierLoss` as an ``nn.Module``, computed by the closed form or the fused kernel.

    Parameters
    ----------
    row_temperature, col_temperature, eps, check_finite, clamp_sums
        As in the core's :class:`~clusterlearn.SelfClassifierLoss` (same defaults).
    gather : "auto", None or callable, default "auto"
        ``None``: the local batch only. A callable with the core's contract
        ``gather(local (n, C)) -> (global (N, C), rows slice)`` whose backward sums the
        gradient over processes. ``"auto"``: :func:`clusterlearn.adapters.torch.all_gather_with_grad`
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

    parameters = (*CoreSelfClassifierLoss.parameters, "kernel")
    __repr__ = CoreSelfClassifierLoss.__repr__

    def __init__(
        self,
        row_temperature: float = 0.1,
        col_temperature: float = 0.05,
        eps: float = 1e-12,
        *,
        gather: Gather | str | None = "auto",
        check_finite: bool = True,
        clamp_sums: bool = True,
        kernel: str = "auto",
    ) -> None:
        torch.nn.Module.__init__(self)
        CoreSelfClassifierLoss.__init__(
            self, row_temperature, col_temperature, eps, check_finite=check_finite, clamp_sums=clamp_sums
        )
        self.gather = check_gather(gather, auto=True)
        self.kernel = _native.check_kernel(kernel)

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
        _, prepared = prepare_heads(heads, names, gather, check_finite=False)  # checked per head below
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


def _parse_torch(logits: tuple[Any, ...]) -> tuple[list[list[torch.Tensor]], list[list[str]]]:
    """The heads of views and their names from a call's arguments; TypeError unless torch tensors."""
    heads, names = parse_logits(call_argument(logits))
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
            check_head(views, slice(None))
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
