"""ODC memories on real data: scikit-learn's handwritten digits, pixels as features.

No network is trained here (the PyTorch example will do that): each iteration feeds a batch
of noisy pixel vectors where a network's features would go, so what is shown is ODC's memory
machinery on its own: momentum-updated sample features, re-labelling to the nearest centroid,
periodic centroid refreshes, small-cluster handling and loss weights. Each epoch prints the
NMI/ACC of the pseudo-labels against the true digit labels, next to plain k-means on the same
pixels. Without a network the pseudo-labels can at best hold k-means' quality; geometric
augmentations (a one-pixel shift) would lower it, since raw pixels are not shift-invariant:
learning that invariance is the network's job.

Run: ``make demo`` or ``python examples/digits_odc_demo.py [--epochs 5 --clusters 10]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import clusterlearn as cl
from clusterlearn import metrics


def augment(pixels: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Pixels (B, 64) in [0, 16] plus Gaussian noise of standard deviation ``noise``."""
    return (pixels + rng.normal(0.0, noise, size=pixels.shape)).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--clusters", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-cluster-size", type=int, default=20)
    p.add_argument("--noise", type=float, default=1.0, help="std of the pixel noise (pixels are 0-16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels, truth = digits.data.astype(np.float32), digits.target
    n = len(pixels)
    rng = np.random.default_rng(args.seed)

    base = cl.kmeans(cl.l2_normalize(pixels), args.clusters, seed=args.seed, backend="array")  # as ODC initialises
    base_nmi, base_acc = metrics.nmi(truth, base.labels), metrics.accuracy(truth, base.labels)
    print(f"digits: {n} images, 64 pixels, {len(np.unique(truth))} classes; ODC with {args.clusters} clusters")
    print(f"k-means on raw pixels:          NMI {base_nmi:.3f}  ACC {base_acc:.3f}")

    odc = cl.OnlineDeepClustering(n, args.clusters, 64, min_cluster_size=args.min_cluster_size, seed=args.seed)
    odc.initialize(pixels)
    print(f"epoch 0 (after initialisation): NMI {metrics.nmi(truth, odc.labels):.3f}  ACC {metrics.accuracy(truth, odc.labels):.3f}")
    for epoch in range(1, args.epochs + 1):
        start, changes, small = time.perf_counter(), [], 0
        for idx in np.array_split(rng.permutation(n), n // args.batch):
            stats = odc.step(idx, augment(pixels[idx], rng, args.noise))
            changes.append(stats["change_ratio"])
            small += stats["num_small_clusters"]
        sizes = odc.cluster_sizes
        print(
            f"epoch {epoch}: NMI {metrics.nmi(truth, odc.labels):.3f}  ACC {metrics.accuracy(truth, odc.labels):.3f}  "
            f"change ratio {np.mean(changes):.3f}  clusters {sizes.min()}-{sizes.max()} samples  "
            f"small clusters re-seeded {small}  ({time.perf_counter() - start:.2f} s)"
        )
    w = odc.loss_weights()
    print(f"loss weights now span {w.min():.4f}-{w.max():.4f} (w ∝ n^-{odc.reweight_power})")


if __name__ == "__main__":
    main()
