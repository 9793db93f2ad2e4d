"""Forward + backward time of SelfClassifierLoss relative to plain cross-entropy, on CPU.

For each batch size N and class count C, two views of float32 logits (N, C) are drawn once.
The baseline is plain cross-entropy on the same two logits arrays with fixed random labels
(the sum of one cross-entropy per view), timed in the same run:

- torch: ``torch.nn.functional.cross_entropy``, the core ``SelfClassifierLoss()(a, b)`` (autograd
  through every op) and the adapter's ``SelfClassifierLoss(gather=None)(a, b)``, both with its
  default fused CPU kernel (``kernel="auto"``, C++ built on first use) and with
  ``kernel="array"`` (``torch.autograd.Function`` with the closed-form backward in torch ops),
  eager, ``loss.backward()`` on leaf tensors;
- jax: ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))`` of a log-softmax cross-entropy
  written with ``jax.nn.log_softmax``, of the core ``SelfClassifierLoss()(a, b)``, of the
  adapter's loss with the fused kernel (XLA FFI custom calls, ``kernel="fused"``), of its
  ``custom_vjp`` in ``jax.numpy`` (``kernel="array"``: the streamed form at these settings) and
  of the same ``custom_vjp`` on the stacked ``(2, N, C)`` views, the form it takes where the
  linear-space guards fail (compilation excluded: one warm-up call first).

Times are the best of interleaved repeats (fewer repeats at large sizes; one warm-up call
each; ``--compile`` adds torch.compile'd versions of the array closed form and of
cross-entropy, compilation excluded). "no finite check" is the fused torch loss with
``check_finite=False`` (the finiteness check reads the logits once more). The table is printed in Markdown; every number in it is
measured by this run. ``--threads`` sets torch's intra-op threads and ``--flush-denormal``
calls ``torch.set_flush_denormal(True)`` (denormal numbers in the backward pass are slow on
x86 CPUs).

Usage::

    python benchmarks/self_classifier.py            # N in {512, 4096}, C in {1000, 8000}
    python benchmarks/self_classifier.py --quick    # N in {128, 512}, C in {100, 1000}
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from clusterlearn.self_classifier import SelfClassifierLoss  # noqa: E402
from machine import cpu_description  # noqa: E402  (benchmarks/, the script's folder)

#: Row label and column order of the timed steps (``ce`` is the baseline).
STEPS = {
    "sc": "core SelfClassifierLoss",
    "fused": "fused kernel",
    "fused_nocheck": "fused, no finite check",
    "fast": "closed-form backward, array ops",
    "fast_stacked": "closed-form, stacked (JAX)",
    "fast_compiled": "closed-form + torch.compile",
    "ce_compiled": "cross-entropy + torch.compile",
}


def best_times(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best (minimum) wall time in seconds of each step over ``repeats`` interleaved rounds.

    Each step must block until its result is ready. One warm-up call each (JAX compiles
    there). The steps alternate within every round, so load from other processes hits them
    alike, and the order rotates by one every round, so that each step follows every other
    one (a step right after the core loss, which churns through tens of MB, ran 0.6-0.8 ms
    slower at 512 x 1000 whichever it was); the minimum is the least disturbed measurement.
    """
    for step in steps.values():
        step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def repeats_for(n: int, c: int) -> int:
    size = n * c
    if size <= 1_000_000:
        return 40
    if size <= 5_000_000:
        return 15
    return 3


def bench_torch(
    a_np: np.ndarray, b_np: np.ndarray, labels: tuple[np.ndarray, np.ndarray], repeats: int, compile_: bool
) -> dict:
    import torch
    import torch.nn.functional as F

    a = torch.tensor(a_np, requires_grad=True)
    b = torch.tensor(b_np, requires_grad=True)
    y1, y2 = (torch.tensor(y) for y in labels)

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            a.grad = None
            b.grad = None
            loss_fn().backward()

        return step

    from clusterlearn.adapters.torch import SelfClassifierLoss as FastLoss

    sc = SelfClassifierLoss()
    fused = FastLoss(gather=None, kernel="fused")
    fused_nocheck = FastLoss(gather=None, kernel="fused", check_finite=False)
    fast = FastLoss(gather=None, kernel="array")
    steps = {
        "ce": run(lambda: F.cross_entropy(a, y1) + F.cross_entropy(b, y2)),
        "sc": run(lambda: sc(a, b)),
        "fused": run(lambda: fused(a, b)),
        "fused_nocheck": run(lambda: fused_nocheck(a, b)),
        "fast": run(lambda: fast(a, b)),
    }
    if compile_:
        fast_compiled = torch.compile(FastLoss(gather=None, check_finite=False, kernel="array"))
        ce_compiled = torch.compile(lambda p, q: F.cross_entropy(p, y1) + F.cross_entropy(q, y2))
        steps["fast_compiled"] = run(lambda: fast_compiled(a, b))
        steps["ce_compiled"] = run(lambda: ce_compiled(a, b))
    return best_times(steps, repeats)


def bench_jax(a_np: np.ndarray, b_np: np.ndarray, labels: tuple[np.ndarray, np.ndarray], repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(a_np)
    b = jnp.asarray(b_np)
    y1, y2 = (jnp.asarray(y) for y in labels)

    def cross_entropy(x: jax.Array, y: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(x, axis=1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    from clusterlearn import self_classifier_closed_form as closed_form
    from clusterlearn.adapters.jax import SelfClassifierLoss as FastLoss
    from clusterlearn.self_classifier import view_pairs
    from clusterlearn.self_classifier_guards import guard_plan

    sc = SelfClassifierLoss()
    fused = FastLoss(kernel="fused")
    fast = FastLoss(kernel="array")
    plan = guard_plan(  # the loss's defaults
        jnp.finfo(a.dtype), *a.shape, row_temperature=0.1, col_temperature=0.05, eps=1e-12, clamp_sums=True,
        pairs=view_pairs(2),
    )

    @jax.custom_vjp
    def stacked(x: jax.Array) -> jax.Array:  # the core's stacked closed form, as the adapter wraps it
        return closed_form.forward(plan, x)[0]

    stacked.defvjp(lambda x: closed_form.forward(plan, x), lambda res, g: (closed_form.backward(plan, res, g),))
    ce_step = jax.jit(jax.value_and_grad(lambda p, q: cross_entropy(p, y1) + cross_entropy(q, y2), argnums=(0, 1)))
    sc_step = jax.jit(jax.value_and_grad(lambda p, q: sc(p, q), argnums=(0, 1)))
    fused_step = jax.jit(jax.value_and_grad(lambda p, q: fused(p, q), argnums=(0, 1)))
    fast_step = jax.jit(jax.value_and_grad(lambda p, q: fast(p, q), argnums=(0, 1)))
    stacked_step = jax.jit(jax.value_and_grad(lambda p, q: stacked(jnp.stack([p, q])), argnums=(0, 1)))

    def run(step: Callable) -> Callable[[], None]:
        return lambda: jax.block_until_ready(step(a, b))

    steps = {
        "ce": run(ce_step),
        "sc": run(sc_step),
        "fused": run(fused_step),
        "fast": run(fast_step),
        "fast_stacked": run(stacked_step),
    }
    return best_times(steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (N in {128, 512}, C in {100, 1000})")
    parser.add_argument("--backends", default="torch,jax", help="comma-separated subset of torch,jax")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    parser.add_argument(
        "--compile", action="store_true",
        help="also time torch.compile of the closed-form loss and of cross-entropy (compilation excluded)",
    )
    args = parser.parse_args()
    if "torch" in args.backends:
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.flush_denormal and not torch.set_flush_denormal(True):
            print("note: this CPU does not support flushing denormals")

    sizes_n = (128, 512) if args.quick else (512, 4096)
    sizes_c = (100, 1000) if args.quick else (1000, 8000)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("torch", "jax"):
            parser.error(f"unknown backend {b!r}")

    rng = np.random.default_rng(args.seed)
    rows = []
    for n in sizes_n:
        for c in sizes_c:
            a = rng.standard_normal((n, c), dtype=np.float32)
            b = rng.standard_normal((n, c), dtype=np.float32)
            labels = (rng.integers(0, c, n), rng.integers(0, c, n))
            repeats = repeats_for(n, c)
            for backend in backends:
                if backend == "torch":
                    result = bench_torch(a, b, labels, repeats, args.compile)
                else:
                    result = bench_jax(a, b, labels, repeats)
                rows.append((backend, n, c, repeats, result))
                print(f"  {backend:5s} N={n:5d} C={c:5d}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in result.items()), flush=True)

    versions = []
    for name in backends:
        mod = __import__(name)
        versions.append(f"{name} {mod.__version__}")
    threads = ftz = ""
    if "torch" in backends:
        import torch

        threads = f", torch threads {torch.get_num_threads()}"
        ftz = ", torch flush-denormal on" if args.flush_denormal else ""
    print()
    print(
        f"Forward+backward, two views, float32, CPU ({cpu_description()}, "
        f"{os.cpu_count()} cores{threads}{ftz}; {', '.join(versions)}). Best of the repeats shown."
    )
    print()
    print("| backend | N | C | repeats | cross-entropy (ms) | " + " | ".join(f"{label} (ms) | ratio" for label in STEPS.values()) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|---:|" * len(STEPS))
    for backend, n, c, repeats, r in rows:
        cells = [
            f"{r[key] * 1e3:.2f} | {r[key] / r['ce']:.2f}×" if key in r else "n/a | –"
            for key in STEPS
        ]
        print(f"| {backend} | {n} | {c} | {repeats} | {r['ce'] * 1e3:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
