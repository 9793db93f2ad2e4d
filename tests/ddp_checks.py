"""Scenarios run inside real 2-process gloo groups by tests/odc/test_torch_ddp.py.

Each rank runs every scenario and saves what it observed to ``out_dir/rank{r}.pt``; the test
compares the ranks with each other and with one process working on the concatenated batches
(computed here too, on rank 0, without the process group).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import clusterlearn as cl
from clusterlearn.adapters import torch as clt

from bounds import linear_head_bounds
from streams import drifting_stream

N, C, DIM, MIN = 96, 4, 8, 3
LOCAL_B = 6
STEPS = 7


def make_stream(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches (world·LOCAL_B rows) of :func:`streams.drifting_stream`, as tensors.

    Features drift to two attractors so labels change; every batch's tail repeats its head
    (DDP padding), so rank 1's last rows repeat rank 0's first: duplicates across ranks.
    """
    _, batches = drifting_stream(7, STEPS, num_samples=N, dim=DIM, batch=world * LOCAL_B, pull=3.0, noise=1.0)
    return [(torch.from_numpy(idx), torch.from_numpy(f)) for idx, f in batches]


def initial_features() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(3).normal(size=(N, DIM)).astype(np.float32))


def odc_kwargs() -> dict[str, Any]:
    return dict(momentum=0.3, min_cluster_size=MIN, centroid_update_interval=2, seed=5, device="cpu")


def odc_scenario(rank: int, world: int) -> dict[str, Any]:
    """Several steps with different data per rank, padded batches, and k-means init."""
    odc = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs())
    feats = initial_features()
    if rank == 1:
        feats = feats + 1.0  # rank 0's features are the ones used
    odc.initialize(feats)
    prints = [odc.fingerprint()]
    stats = []
    for idx, f in make_stream(world):
        part = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        stats.append(odc.step(idx[part], f[part]))
        prints.append(odc.fingerprint())
    odc.check_consistency()
    state = odc.state_dict()
    return {"prints": prints, "stats": stats, "state": state, "bf16_labels": bfloat16_initial_labels(feats)}


def bfloat16_initial_labels(feats: torch.Tensor) -> torch.Tensor:
    """k-means labels of a bfloat16 memory's initialisation (clustered as the memory holds the rows).

    The rows are a common offset plus variations of a few bfloat16 ulps, so that the cast to
    bfloat16 changes which rows are nearest.
    """
    odc = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs(), dtype=torch.bfloat16)
    odc.initialize(1.0 + 0.01 * feats)
    return odc.labels.clone()


def odc_single(world: int) -> dict[str, Any]:
    """The same stream in one process (no process group) on the concatenated batches."""
    odc = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs())
    odc.initialize(initial_features())
    prints = [odc.fingerprint()]
    stats = []
    for idx, f in make_stream(world):
        stats.append(odc.step(idx, f))
        prints.append(odc.fingerprint())
    return {"prints": prints, "stats": stats, "bf16_labels": bfloat16_initial_labels(initial_features())}


def errors_scenario(rank: int, world: int) -> dict[str, Any]:
    """Bad input on one rank raises on every rank, the memory is unchanged, the group still works."""
    odc = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs())
    odc.initialize(initial_features())
    before = odc.fingerprint()
    idx = torch.arange(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    f = torch.ones(LOCAL_B, DIM)
    cases = {
        "float indices on rank 1": (idx.float() if rank == 1 else idx, f),
        "short batch on rank 1": (idx[:-1] if rank == 1 else idx, f[:-1] if rank == 1 else f),
        "out of range on rank 0": (idx + N if rank == 0 else idx, f),
        "NaN on rank 1": (idx, f * float("nan") if rank == 1 else f),
    }
    seen: dict[str, str] = {}
    for name, (i, x) in cases.items():
        try:
            odc.step(i, x)
            seen[name] = "no error"
        except (ValueError, TypeError) as err:
            seen[name] = f"{type(err).__name__}: {err}"
    after = odc.fingerprint()
    odc.step(idx, f)  # the group still works after the errors

    fresh = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs())
    half = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs())
    if rank == 0:
        half.load_state_dict(odc.state_dict())
    feats = initial_features()
    data = torch.utils.data.TensorDataset(torch.ones(3, 2))
    collectives = {
        "initialize NaN on rank 0": lambda: fresh.initialize(feats * float("nan") if rank == 0 else feats),
        "initialize float labels on rank 1": lambda: fresh.initialize(
            feats, torch.zeros(N) if rank == 1 else torch.zeros(N, dtype=torch.int64)
        ),
        "step, uninitialised on rank 1": lambda: half.step(idx, f),
        "Self-Classifier, mismatched views on rank 1": lambda: clt.SelfClassifierLoss()(
            torch.randn(4, 5), torch.randn(4 if rank == 0 else 3, 5)
        ),
        "Self-Classifier, shorter batch on rank 1": lambda: clt.SelfClassifierLoss()(
            torch.randn(4 if rank == 0 else 3, 5), torch.randn(4 if rank == 0 else 3, 5)
        ),
        "extract_features, no batch on rank 1": lambda: clt.extract_features(
            torch.nn.Linear(2, 2), torch.utils.data.DataLoader(data, sampler=[0, 1, 2] if rank == 0 else []),
            progress=False,
        ),
    }
    for name, call in collectives.items():
        try:
            call()
            seen[name] = "no error"
        except (ValueError, TypeError) as err:
            seen[name] = f"{type(err).__name__}: {err}"
    odc.step(idx, f)  # and still works
    return {"errors": seen, "unchanged": before == after}


def loss_scenario(rank: int, world: int) -> dict[str, Any]:
    """Self-Classifier loss over the global batch under DDP: loss and parameter gradients."""
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 6)
    x = torch.from_numpy(np.random.default_rng(11).normal(size=(2, world * 4, 5)).astype(np.float32))
    out: dict[str, Any] = {}
    for name, make in {
        "fast": lambda: clt.SelfClassifierLoss(),
        "core+gather": lambda: cl.SelfClassifierLoss(gather=clt.all_gather_with_grad),
    }.items():
        model = torch.nn.parallel.DistributedDataParallel(_copy(base))
        part = slice(rank * 4, (rank + 1) * 4)
        loss = make()(model(x[0, part]), model(x[1, part]))
        loss.backward()
        out[name] = {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}
    # A plain all_gather without gradient: the trap the adapter avoids.
    model = torch.nn.parallel.DistributedDataParallel(_copy(base))
    part = slice(rank * 4, (rank + 1) * 4)

    def plain(local: torch.Tensor) -> tuple[torch.Tensor, slice]:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach())
        parts[rank] = local
        return torch.cat(parts), slice(rank * 4, (rank + 1) * 4)

    cl.SelfClassifierLoss(gather=plain)(model(x[0, part]), model(x[1, part])).backward()
    out["plain"] = {"grads": [p.grad.clone() for p in model.parameters()]}
    return out


def loss_single(world: int) -> dict[str, Any]:
    """The loss and gradients of one process on the concatenated batch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6)
    x = torch.from_numpy(np.random.default_rng(11).normal(size=(2, world * 4, 5)).astype(np.float32))
    logits = [model(x[0]), model(x[1])]
    loss = cl.SelfClassifierLoss()(*logits)
    logit_grads = torch.autograd.grad(loss, logits, retain_graph=True)
    loss.backward()
    # rounding bounds of a second float32 computation (tests/bounds.py; the bias as a row of W)
    ones = torch.ones(x.shape[1], 1)
    inputs = [torch.cat([x[v], ones], dim=1).numpy() for v in range(2)]
    weight = torch.cat([model.weight.T, model.bias[None]]).detach().numpy()
    bounds = linear_head_bounds(inputs, weight, float(loss), [g.numpy() for g in logit_grads], np.float32)
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()], "loss_atol": bounds[0], "grad_atol": bounds[1]}


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    clone = torch.nn.Linear(module.in_features, module.out_features)
    clone.load_state_dict(module.state_dict())
    return clone


def data_scenario(rank: int, world: int) -> dict[str, Any]:
    """extract_features with DistributedSampler padding; UniformClusterSampler shards."""
    data = torch.utils.data.TensorDataset(torch.arange(11, dtype=torch.float32)[:, None].repeat(1, 3))
    sampler = torch.utils.data.DistributedSampler(data, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, 1.0)
    torch.nn.init.zeros_(model.bias)
    feats = clt.extract_features(model, loader, progress=False)
    labels = torch.from_numpy(np.repeat(np.arange(5), [2, 3, 10, 4, 6]))
    shards = {}
    for epoch in (0, 1):
        s = clt.UniformClusterSampler(labels, num_samples=31, seed=4)
        s.set_epoch(epoch)
        shards[epoch] = torch.tensor(list(s))
    return {"features": feats, "shards": shards}


class _FailingData(torch.utils.data.Dataset):
    """Three samples; reading sample 2 raises OSError (a corrupt file)."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2:
            raise OSError(f"cannot identify image file 'img{i}.jpg'")
        return torch.ones(2)


def faults_scenario(rank: int, world: int) -> dict[str, Any]:
    """Faults that used to abort a rank, hand it another rank's bytes, or leave it waiting.

    Each case is one collective call on both ranks; what each rank raised is recorded, and
    the ODC memory must be unchanged by the failed calls. Then replicas whose step counters
    differ, and a rank without memories: the check fails, ``sync_from_rank0`` repairs.
    """
    other = rank == 1  # the rank that gets the fault unless the case says otherwise
    odc = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs())
    odc.initialize(initial_features())
    idx = torch.arange(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    f = torch.ones(LOCAL_B, DIM)
    loss = clt.SelfClassifierLoss(kernel="array")
    x32 = torch.randn(4, 5)
    feats = initial_features()

    def views(*dtypes: torch.dtype) -> list[torch.Tensor]:
        return [x32.to(dt) for dt in dtypes]

    def extract(dataset: Any, sampler: list[int]) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=2)
        return clt.extract_features(torch.nn.Linear(2, 2), loader, progress=False)

    def sync_other_dtype() -> None:
        replica = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs(), dtype=torch.float64 if other else torch.float32)
        if not other:
            replica.load_state_dict(odc.state_dict())
        replica.sync_from_rank0()

    cases = {
        "loss float64 on rank 1": lambda: loss(*views(*[torch.float64 if other else torch.float32] * 2)),
        "loss one float16 view on rank 1": lambda: loss(
            *views(torch.float32, torch.float16 if other else torch.float32)
        ),
        "loss numpy on rank 1": lambda: loss(x32.numpy() if other else x32, x32.numpy() if other else x32),
        "loss grad on rank 1 only": lambda: loss(x32.clone().requires_grad_(other), x32),
        # 130 views: the header is over 4 KiB, so it takes the exchange's second round.
        "loss 130 views, the last float64 on rank 1": lambda: loss(
            *views(*[torch.float32] * 129, torch.float64 if other else torch.float32)
        ),
        "gather float64 on rank 1": lambda: clt.all_gather_with_grad(x32.double() if other else x32),
        "gather a list on rank 1": lambda: clt.all_gather_with_grad([1.0] if other else x32),
        "loss other temperature on rank 1": lambda: clt.SelfClassifierLoss(
            row_temperature=0.2 if other else 0.1, kernel="array"
        )(x32, x32),
        "gather 3-D on rank 1": lambda: clt.all_gather_with_grad(x32[..., None] if other else x32),
        "step uint16 indices on rank 1": lambda: odc.step(idx.to(torch.uint16) if other else idx, f),
        "step uint32 indices on rank 1": lambda: odc.step(idx.to(torch.uint32) if other else idx, f),
        "step uint64 indices on rank 1": lambda: odc.step(idx.to(torch.uint64) if other else idx, f),
        "step float8 features on rank 1": lambda: odc.step(idx, f.to(torch.float8_e4m3fn) if other else f),
        "step sparse features on rank 1": lambda: odc.step(idx, f.to_sparse() if other else f),
        "initialize uint32 labels on rank 1": lambda: clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs()).initialize(
            feats, torch.zeros(N, dtype=torch.uint32 if other else torch.int64)
        ),
        "initialize other num_samples on rank 1": lambda: clt.OnlineDeepClustering(
            N + other, C, DIM, **odc_kwargs()
        ).initialize(torch.cat([feats, feats[:other]])),
        "sync float64 replica on rank 1": sync_other_dtype,
        "extract_features OSError on rank 1": lambda: extract(_FailingData(), [2] if other else [0, 1]),
    }
    before = odc.fingerprint()
    seen = _outcomes(cases)
    unchanged = before == odc.fingerprint()
    odc.step(idx, f)  # the group still works

    # Replicas whose step counters differ (rank 1 resumed from a later checkpoint's counter).
    state = odc.state_dict()
    if other:
        state["iteration"] += 1
        odc.load_state_dict(state)
    replicas = _outcomes(
        {"check, counters differ": odc.check_consistency, "step, counters differ": lambda: odc.step(idx, f)}
    )
    odc.sync_from_rank0()
    odc.check_consistency()
    odc.step(idx, f)
    fresh = clt.OnlineDeepClustering(N, C, DIM, **odc_kwargs())  # memories only on rank 0
    if not other:
        fresh.load_state_dict(odc.state_dict())
    replicas |= _outcomes({"check, no memories on rank 1": fresh.check_consistency})
    fresh.sync_from_rank0()
    fresh.check_consistency()
    return {
        "errors": seen,
        "replicas": replicas,
        "after sync": [odc.iteration, odc.fingerprint(), fresh.iteration, fresh.fingerprint()],
        "unchanged": unchanged,
    }


def _outcomes(calls: dict[str, Any]) -> dict[str, str]:
    """``"no error"`` or ``"<exception type>: <message>"`` of each call, in order."""
    seen = {}
    for name, call in calls.items():
        try:
            call()
            seen[name] = "no error"
        except Exception as err:  # noqa: BLE001 - recorded for the test
            seen[name] = f"{type(err).__name__}: {err}"
    return seen


#: Seconds one scenario may take before its process dumps its stack and exits: a hang
#: (a rank waiting in a collective its peer never joins) fails the test within this time.
SCENARIO_TIMEOUT = {"odc": 120, "errors": 60, "loss": 180, "data": 60, "faults": 30}


def main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    scenarios = {
        "odc": odc_scenario,
        "errors": errors_scenario,
        "loss": loss_scenario,
        "data": data_scenario,
        "faults": faults_scenario,
    }
    try:
        torch.set_num_threads(1)
        for name, scenario in scenarios.items():
            faulthandler.dump_traceback_later(SCENARIO_TIMEOUT[name], exit=True)
            result = scenario(rank, world)
            faulthandler.cancel_dump_traceback_later()
            torch.save(result, os.path.join(out_dir, f"rank{rank}-{name}.pt"))  # kept if a later one fails
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
