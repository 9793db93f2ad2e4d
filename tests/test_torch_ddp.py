"""The PyTorch adapter in a real 2-process gloo group (scenarios in tests/ddp_checks.py).

Both ranks run every scenario once per session (two subprocesses); each test compares what
they saw with each other and with one process working on the concatenated batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))
import ddp_checks  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    init = out / "init"
    script = Path(__file__).with_name("ddp_checks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(WORLD), str(init), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process gloo run did not finish in 300 s")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_odc_replicas_identical_and_equal_to_one_process(ranks: list[dict[str, Any]]) -> None:
    single = ddp_checks.odc_single(WORLD)
    r0, r1 = ranks[0]["odc"], ranks[1]["odc"]
    assert r0["prints"] == r1["prints"]
    assert r0["prints"] == single["prints"]
    assert r0["stats"] == single["stats"]
    # The stream really changes labels, and the last (padded) batch counts repeats once.
    assert any(s["change_ratio"] > 0 for s in single["stats"])
    assert len(set(single["prints"])) == len(single["prints"])


def test_odc_state_dict_loads_with_weights_only(ranks: list[dict[str, Any]]) -> None:
    state = ranks[0]["odc"]["state"]
    from clusterlearn.adapters import torch as clt

    odc = clt.OnlineDeepClustering(ddp_checks.N, ddp_checks.C, ddp_checks.DIM, **ddp_checks.odc_kwargs())
    odc.load_state_dict(state)
    assert odc.fingerprint() == ranks[0]["odc"]["prints"][-1]


@pytest.mark.parametrize(
    "case",
    [
        "float indices on rank 1",
        "short batch on rank 1",
        "out of range on rank 0",
        "NaN on rank 1",
        "initialize NaN on rank 0",
        "initialize float labels on rank 1",
        "extract_features, no batch on rank 1",
        "Self-Classifier, mismatched views on rank 1",
        "Self-Classifier, shorter batch on rank 1",
    ],
)
def test_bad_input_on_one_rank_raises_on_every_rank(ranks: list[dict[str, Any]], case: str) -> None:
    msgs = [r["errors"]["errors"][case] for r in ranks]
    assert all(m.startswith(("ValueError", "TypeError")) for m in msgs), msgs
    bad = 0 if "rank 0" in case else 1
    assert "rank(s) [" in msgs[1 - bad] or "differs across ranks" in msgs[1 - bad], msgs
    assert all(r["errors"]["unchanged"] for r in ranks)


def test_step_on_a_rank_without_memories_raises_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    msgs = [r["errors"]["errors"]["step, uninitialised on rank 1"] for r in ranks]
    assert msgs[1].startswith("NotInitializedError") and "rank(s) [1]" in msgs[0], msgs


def test_short_batch_message_names_the_sizes(ranks: list[dict[str, Any]]) -> None:
    msg = ranks[0]["errors"]["errors"]["short batch on rank 1"]
    assert "batch size differs across ranks ([6, 5]" in msg


@pytest.mark.parametrize("kind", ["fast", "core+gather"])
def test_self_classifier_loss_and_gradients_match_one_process(ranks: list[dict[str, Any]], kind: str) -> None:
    single = ddp_checks.loss_single(WORLD)
    # Each rank's loss averages the global-softmax terms over its own rows: their mean is the
    # loss of the whole batch, and DDP's averaged gradients are that loss's gradients.
    losses = torch.stack([r["loss"][kind]["loss"] for r in ranks])
    torch.testing.assert_close(losses.mean(), single["loss"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(losses[0], losses[1])
    for r in ranks:
        for g, want in zip(r["loss"][kind]["grads"], single["grads"]):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


def test_plain_all_gather_gives_wrong_gradients(ranks: list[dict[str, Any]]) -> None:
    single = ddp_checks.loss_single(WORLD)
    got = ranks[0]["loss"]["plain"]["grads"][0]
    assert not torch.allclose(got, single["grads"][0], rtol=1e-3, atol=1e-6)


def test_extract_features_in_dataset_order_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    want = torch.arange(11, dtype=torch.float32)[:, None].repeat(1, 2) * 3
    for r in ranks:
        torch.testing.assert_close(r["data"]["features"], want)


def test_uniform_cluster_sampler_shards(ranks: list[dict[str, Any]]) -> None:
    import clusterlearn as cl

    labels = np.repeat(np.arange(5), [2, 3, 10, 4, 6])
    for epoch in (0, 1):
        shards = [r["data"]["shards"][epoch].numpy() for r in ranks]
        assert len(shards[0]) == len(shards[1]) == 16
        interleaved = np.empty(32, dtype=np.int64)
        interleaved[0::2], interleaved[1::2] = shards
        full = cl.UniformLabelSampler(labels, num_samples=31, seed=4).epoch_indices(epoch)
        np.testing.assert_array_equal(interleaved[:31], full)  # disjoint positions covering the epoch
        assert interleaved[31] == full[0]  # padding repeats the start
        counts = np.bincount(labels[full], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert not np.array_equal(ranks[0]["data"]["shards"][0], ranks[0]["data"]["shards"][1])
