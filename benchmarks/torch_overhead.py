"""Share of an ODC training iteration (ResNet-50, torch, CPU, small batch) spent in clusterlearn.

Each iteration times, in order: ``odc.labels_of(idx)``, ``odc.loss_weights(like=logits)``
(clusterlearn), the network's forward, weighted cross-entropy, backward and SGD step (torch),
then ``odc.step(idx, features)`` (clusterlearn: memory update, re-labelling against all C
centroids, exact size/sum updates, the centroid refresh every 10th iteration, small-cluster
check). The memories are at ImageNet scale by default (N = 1,281,167, C = 10,000, D = 256),
initialised from random unit features and random labels. Prints a Markdown table; the target
is clusterlearn ≤ 3 % of the iteration.

Run: ``python benchmarks/torch_overhead.py [--batch 8 --resolution 224 --iters 10 --n 1281167]``
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

from clusterlearn.adapters import torch as clt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (after 2 warm-up ones)")
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--c", type=int, default=10_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    backbone = torchvision.models.get_model(args.arch, weights=None)
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    neck, head = clt.ODCNeck(width, width, args.d), clt.ODCHead(args.d, args.c)
    params = [*backbone.parameters(), *neck.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)

    odc = clt.OnlineDeepClustering(args.n, args.c, args.d, device="cpu")
    start = time.perf_counter()
    odc.initialize(torch.randn(args.n, args.d), torch.randint(0, args.c, (args.n,)))
    print(f"memories: N = {args.n:,}, C = {args.c:,}, D = {args.d} (initialised in {time.perf_counter() - start:.1f} s); "
          f"{args.arch} at {args.resolution}px, batch {args.batch}, {torch.get_num_threads()} torch threads")

    parts = ["labels_of", "loss_weights", "network (forward, loss, backward, SGD)", "step"]
    totals = dict.fromkeys(parts, 0.0)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    for it in range(args.iters + 2):
        idx = torch.randint(0, args.n, (args.batch,))
        t0 = time.perf_counter()
        targets = odc.labels_of(idx)
        t1 = time.perf_counter()
        feats = neck(backbone(x))
        logits = head(feats)
        t2 = time.perf_counter()
        weights = odc.loss_weights(like=logits)
        t3 = time.perf_counter()
        loss = nn.functional.cross_entropy(logits, targets, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t4 = time.perf_counter()
        odc.step(idx, feats.detach())
        t5 = time.perf_counter()
        if it >= 2:
            for part, seconds in zip(parts, (t1 - t0, t3 - t2, (t2 - t1) + (t4 - t3), t5 - t4)):
                totals[part] += seconds

    whole = sum(totals.values())
    ours = whole - totals[parts[2]]
    print(f"\n{args.iters} iterations (one centroid refresh per 10), mean per iteration:\n")
    print("| part | ms / iteration | share of the iteration |")
    print("|---|---:|---:|")
    for part in parts:
        print(f"| {part} | {1000 * totals[part] / args.iters:.2f} | {100 * totals[part] / whole:.3f} % |")
    print(f"| **clusterlearn total** | {1000 * ours / args.iters:.2f} | {100 * ours / whole:.3f} % |")
    print(f"\ntarget ≤ 3 %: {'met' if ours / whole <= 0.03 else 'NOT met'}")


if __name__ == "__main__":
    main()
