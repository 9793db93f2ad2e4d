"""One rank of the sharded-memory checks (run by tests/odc/test_torch_sharded.py under gloo).

Usage: sharded_checks.py RANK WORLD INIT_FILE OUT_DIR MODE CKPT
MODE "crash": steps from the start, checkpoint (torch.distributed.checkpoint) to CKPT after
SAVE_AT steps, and the last rank dies (``os._exit``) two steps later; "resume": load CKPT
(written under another world size), steps SAVE_AT..STEPS; "deepcluster": two epochs of the sharded DeepCluster labeler over the ranks
(``clusterlearn.adapters.torch.psum``), each rank's labels, NMI and sampler draws written out. After every step each rank compares its memory with a replicated reference
(the core's OnlineDeepClustering on the concatenated batches, computed in this process):
labels, sizes, sums, centroids and iteration bit for bit, its features row for row. It writes
OUT_DIR/rank{RANK}.json with what it saw.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import clusterlearn as cl
from clusterlearn.adapters.torch import ShardedOnlineDeepClustering, psum
from clusterlearn.deepcluster_shard import ShardedDeepClusterLabeler
from clusterlearn.shards import ShardLayout

N, C, D, PER_RANK = 241, 6, 8, 12
STEPS, SAVE_AT = 16, 7
SETTINGS = dict(momentum=0.3, min_cluster_size=36, centroid_update_interval=3, seed=5)


def global_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """Global batches of 12 rows (divisible by 1, 2, 3 ranks) pulled toward rotating
    attractors (labels change, clusters shrink below 36 and are split), with repeats."""
    rng = np.random.default_rng(0)
    attract = rng.normal(size=(3, D)) * 2
    out = []
    for k in range(STEPS):
        i = rng.choice(N, size=PER_RANK, replace=False)
        i[-2:] = i[:2]  # DDP padding repeats
        f = attract[(k // 4) % 3] + 0.4 * rng.normal(size=(PER_RANK, D))
        out.append((i.astype(np.int64), f.astype(np.float32)))
    return out


def reference() -> tuple[cl.OnlineDeepClustering, list[tuple[np.ndarray, np.ndarray]]]:
    x0 = np.random.default_rng(1).normal(size=(N, D)).astype(np.float32)
    odc = cl.OnlineDeepClustering(N, C, D, like=torch.empty(0), **SETTINGS)
    odc.initialize(torch.from_numpy(x0))
    return odc, x0


def compare(sharded: ShardedOnlineDeepClustering, ref: cl.OnlineDeepClustering, where: str) -> None:
    s, r = sharded.state, ref.state
    for name in ("labels", "sizes", "sums", "centroids", "iteration"):
        if not torch.equal(getattr(s, name), getattr(r, name)):
            raise AssertionError(f"{where}: {name} differs from the replicated reference")
    rows = sharded.shard_indices()
    if not torch.equal(sharded.local_features(), r.features[rows]):
        raise AssertionError(f"{where}: features of rows {int(rows[0])}.. differ")


def deepcluster(rank: int, world: int) -> dict:
    """Two epochs of the sharded labeler on planted clusters (the second on noisier features)."""
    rng = np.random.default_rng(2)
    truth = rng.integers(4, size=N)
    x = (rng.normal(size=(4, D)) * 8)[truth] + rng.normal(size=(N, D))
    layout = ShardLayout(N, world)
    start, stop = layout.start(rank), min(layout.start(rank) + layout.block, N)
    labeler = ShardedDeepClusterLabeler(4, offset=start, num_samples=N, shard=rank, num_shards=world, psum=psum(),
                                        pca_dim=6, n_iter=10, sample_per_centroid=30)
    first = labeler(torch.from_numpy(x[start:stop].astype(np.float32)))
    second = labeler(torch.from_numpy((x[start:stop] + rng.normal(size=(stop - start, D)) * 5).astype(np.float32)))
    draws = labeler.sampler(second.labels, num_samples=60, seed=3).epoch_indices(0)
    return {"first": first.labels.tolist(), "second": second.labels.tolist(), "nmi": second.nmi_previous,
            "truth": truth[start:stop].tolist(), "draws": draws.tolist(), "rows": [start, stop]}


def main(rank: int, world: int, init_file: str, out_dir: str, mode: str, ckpt: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    faulthandler.dump_traceback_later(240, exit=True)
    torch.set_num_threads(1)
    seen: dict = {"changed": 0, "splits": 0, "errors": []}
    try:
        if mode == "deepcluster":
            seen.update(deepcluster(rank, world), ok=True)
            return
        ref, x0 = reference()
        odc = ShardedOnlineDeepClustering(N, C, D, **SETTINGS)
        batches = global_batches()
        b = PER_RANK // world
        if mode == "crash":
            # each rank extracts its own rows only (extract_features(local=True), nothing gathered)
            from clusterlearn.adapters.torch import extract_features

            subset = torch.utils.data.Subset(torch.utils.data.TensorDataset(torch.from_numpy(x0)), odc.shard_indices().tolist())
            mine = extract_features(torch.nn.Identity(), torch.utils.data.DataLoader(subset, batch_size=5), progress=False, local=True)
            if not torch.equal(mine, torch.from_numpy(x0[odc.shard_indices().numpy()])):
                raise AssertionError("extract_features(local=True) did not return this rank's rows in order")
            odc.initialize(mine, labels=ref.labels)
            # labels given: start from the reference's k-means (sharded k-means has its own tests)
            odc.state = odc.state._replace(**{k: getattr(ref.state, k).clone() for k in ("labels", "centroids", "sizes", "sums")})
            odc.state = odc.state._replace(features=odc.state.features.clone())
            odc.state.features[: len(odc.shard_indices())] = ref.state.features[odc.shard_indices()]
            first = 0
        else:
            odc.load(ckpt)
            for i, f in batches[:SAVE_AT]:
                ref.step(torch.from_numpy(i), torch.from_numpy(f))
            first = SAVE_AT
        compare(odc, ref, "start")
        for k in range(first, STEPS):
            i, f = batches[k]
            mine = slice(rank * b, (rank + 1) * b)
            if k == 3:  # bad input on the last rank only: every rank raises, nothing changes
                bad = torch.from_numpy(f[mine]).clone()
                if rank == world - 1:
                    bad[0, 0] = float("nan")
                try:
                    odc.step(torch.from_numpy(i[mine]), bad)
                except (ValueError, TypeError) as err:
                    seen["errors"].append(type(err).__name__)
                compare(odc, ref, "after a refused batch")
            got = odc.step(torch.from_numpy(i[mine]), torch.from_numpy(f[mine]))
            want = ref.step(torch.from_numpy(i), torch.from_numpy(f))
            if got != want:
                raise AssertionError(f"step {k}: stats {got} != {want}")
            seen["changed"] += round(got["change_ratio"] * 10)
            seen["splits"] += got["num_splits"]
            compare(odc, ref, f"step {k}")
            if mode == "crash" and k + 1 == SAVE_AT:
                odc.save(ckpt)
            if mode == "crash" and k == SAVE_AT + 1 and rank == world - 1:
                os._exit(3)  # killed mid-run: the others fail in their next collective
        seen["ok"] = True
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(seen, fh)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
