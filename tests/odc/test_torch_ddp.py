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

import ddp_checks  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)

pytestmark = pytest.mark.slow  # every test reads the ranks of one 2-process run

WORLD = 2


class _Rank(dict):
    """One rank's results by scenario; a scenario it did not finish fails the test with its log."""

    def __init__(self, results: dict[str, Any], log: str) -> None:
        super().__init__(results)
        self.log = log

    def __missing__(self, scenario: str) -> Any:
        pytest.fail(f"this rank did not finish the {scenario!r} scenario:\n{self.log[-4000:]}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[_Rank]:
    out = tmp_path_factory.mktemp("ddp")
    init = out / "init"
    script = Path(ddp_checks.__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(WORLD), str(init), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )
        for r in range(WORLD)
    ]
    # Each scenario has its own watchdog (ddp_checks.SCENARIO_TIMEOUT); this is a backstop.
    limit = sum(ddp_checks.SCENARIO_TIMEOUT.values()) + 60
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=limit)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the 2-process gloo run did not finish in {limit} s")
    return [
        _Rank(
            {s: torch.load(out / f"rank{r}-{s}.pt", weights_only=True)
             for s in ddp_checks.SCENARIO_TIMEOUT if (out / f"rank{r}-{s}.pt").exists()},
            f"exit status {p.returncode}\n{log}",
        )
        for r, (p, log) in enumerate(zip(procs, logs))
    ]


def test_odc_replicas_identical_and_equal_to_one_process(ranks: list[_Rank]) -> None:
    single = ddp_checks.odc_single(WORLD)
    r0, r1 = ranks[0]["odc"], ranks[1]["odc"]
    assert r0["prints"] == r1["prints"]
    assert r0["prints"] == single["prints"]
    assert r0["stats"] == single["stats"]
    # The stream really changes labels, and padded batches count repeats once.
    assert any(s["change_ratio"] > 0 for s in single["stats"])
    assert len(set(single["prints"])) == len(single["prints"])


def test_a_bfloat16_memory_starts_from_the_same_clusters_under_ddp(ranks: list[_Rank]) -> None:
    """Rank 0's k-means clusters the rows as the memory holds them (bfloat16), as one process does."""
    single = ddp_checks.odc_single(WORLD)["bf16_labels"]
    for rank in ranks:
        assert torch.equal(rank["odc"]["bf16_labels"], single)


def test_odc_state_dict_loads_with_weights_only(ranks: list[_Rank]) -> None:
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
def test_bad_input_on_one_rank_raises_on_every_rank(ranks: list[_Rank], case: str) -> None:
    msgs = [r["errors"]["errors"][case] for r in ranks]
    assert all(m.startswith(("ValueError", "TypeError")) for m in msgs), msgs
    bad = 0 if "rank 0" in case else 1
    assert "rank(s) [" in msgs[1 - bad] or "differs across ranks" in msgs[1 - bad], msgs
    assert all(r["errors"]["unchanged"] for r in ranks)


def test_step_on_a_rank_without_memories_raises_on_every_rank(ranks: list[_Rank]) -> None:
    msgs = [r["errors"]["errors"]["step, uninitialised on rank 1"] for r in ranks]
    assert msgs[1].startswith("NotInitializedError") and "rank(s) [1]" in msgs[0], msgs


def test_short_batch_message_names_the_sizes(ranks: list[_Rank]) -> None:
    msg = ranks[0]["errors"]["errors"]["short batch on rank 1"]
    assert "batch size differs across ranks ([6, 5]" in msg


@pytest.mark.parametrize("kind", ["fast", "core+gather"])
def test_self_classifier_loss_and_gradients_match_one_process(ranks: list[_Rank], kind: str) -> None:
    single = ddp_checks.loss_single(WORLD)
    # Each rank's loss averages the global-softmax terms over its own rows: their mean is the
    # loss of the whole batch, and DDP's averaged gradients are that loss's gradients.
    losses = torch.stack([r["loss"][kind]["loss"] for r in ranks])
    # within the rounding bounds of a second float32 computation (ddp_checks.loss_single)
    torch.testing.assert_close(losses.mean(), single["loss"], rtol=0, atol=single["loss_atol"])
    assert not torch.allclose(losses[0], losses[1])
    for r in ranks:
        for g, want in zip(r["loss"][kind]["grads"], single["grads"]):
            torch.testing.assert_close(g, want, rtol=0, atol=single["grad_atol"])


def test_plain_all_gather_gives_wrong_gradients(ranks: list[_Rank]) -> None:
    single = ddp_checks.loss_single(WORLD)
    got = ranks[0]["loss"]["plain"]["grads"][0]
    assert float((got - single["grads"][0]).abs().max()) > 2 * single["grad_atol"]  # beyond rounding


def test_extract_features_in_dataset_order_on_every_rank(ranks: list[_Rank]) -> None:
    want = torch.arange(11, dtype=torch.float32)[:, None].repeat(1, 2) * 3
    for r in ranks:
        torch.testing.assert_close(r["data"]["features"], want)


def test_uniform_cluster_sampler_shards(ranks: list[_Rank]) -> None:
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


# ---------------------------------------------------------------------------------------------
# Faults that used to abort one rank, hand it bytes of another layout, or leave it waiting


def _fault(ranks: list[_Rank], case: str) -> list[str]:
    return [r["faults"]["errors"][case] for r in ranks]


@pytest.mark.parametrize(
    ("case", "label", "values"),
    [
        ("loss float64 on rank 1", "logits[0] dtype", "torch.float64 on rank 1 but torch.float32 on rank 0"),
        ("loss one float16 view on rank 1", "logits[1] dtype", "torch.float16 on rank 1 but torch.float32 on rank 0"),
        ("loss 130 views, the last float64 on rank 1", "logits[129] dtype",
         "torch.float64 on rank 1 but torch.float32 on rank 0"),
        ("loss grad on rank 1 only", "logits[0] requires grad", "True on rank 1 but False on rank 0"),
        ("gather float64 on rank 1", "x dtype", "torch.float64 on rank 1 but torch.float32 on rank 0"),
        ("gather 3-D on rank 1", "x shape", "[4, 5, 1] on rank 1 but [4, 5] on rank 0"),
        ("loss other temperature on rank 1", "row_temperature", "0.2 on rank 1 but 0.1 on rank 0"),
        ("initialize other num_samples on rank 1", "num_samples", "97 on rank 1 but 96 on rank 0"),
        ("sync float64 replica on rank 1", "memory dtype", "torch.float64 on rank 1 but torch.float32 on rank 0"),
    ],
)
def test_layout_differing_across_ranks_raises_the_same_error_on_every_rank(
    ranks: list[_Rank], case: str, label: str, values: str
) -> None:
    msgs = _fault(ranks, case)
    assert msgs[0] == msgs[1], msgs
    assert msgs[0].startswith("ValueError") and f"{label} differs across ranks" in msgs[0] and values in msgs[0], msgs


@pytest.mark.parametrize(
    ("case", "error", "names"),
    [
        ("loss numpy on rank 1", "TypeError", "needs torch tensors"),
        ("gather a list on rank 1", "TypeError", "x must be a torch.Tensor, got list"),
        ("step uint16 indices on rank 1", "TypeError", "indices must have a signed integer dtype"),
        ("step uint32 indices on rank 1", "TypeError", "indices must have a signed integer dtype"),
        ("step uint64 indices on rank 1", "TypeError", "indices must have a signed integer dtype"),
        ("step float8 features on rank 1", "TypeError", "features must be float16, bfloat16, float32 or float64"),
        ("step sparse features on rank 1", "TypeError", "features must be a dense (strided) tensor"),
        ("initialize uint32 labels on rank 1", "TypeError", "labels must have a signed integer dtype"),
        ("extract_features OSError on rank 1", "OSError", "cannot identify image file"),
    ],
)
def test_any_error_on_one_rank_is_raised_on_every_rank(ranks: list[_Rank], case: str, error: str, names: str) -> None:
    msgs = _fault(ranks, case)
    assert msgs[1].startswith(f"{error}: ") and names in msgs[1], msgs
    # The peer names the rank and its exception; bad input stays a ValueError there.
    peer = "ValueError" if error == "TypeError" else "RuntimeError"
    assert msgs[0].startswith(f"{peer}: ") and f"rank 1: {error}: " in msgs[0] and names in msgs[0], msgs
    assert all(r["faults"]["unchanged"] for r in ranks)


def test_replicas_with_different_step_counters_fail_the_check_and_sync_repairs_them(ranks: list[_Rank]) -> None:
    checks = [r["faults"]["replicas"]["check, counters differ"] for r in ranks]
    assert all(m.startswith("RuntimeError") and "memories of rank 1 differ from rank 0's" in m and "iteration" in m for m in checks), checks
    steps = [r["faults"]["replicas"]["step, counters differ"] for r in ranks]
    assert all(m.startswith("ValueError") and "iteration differs across ranks" in m for m in steps), steps
    # After sync_from_rank0 (also onto a rank that had no memories) the replicas are equal.
    after = [r["faults"]["after sync"] for r in ranks]
    assert after[0] == after[1], after
    missing = [r["faults"]["replicas"]["check, no memories on rank 1"] for r in ranks]
    assert missing[1].startswith("NotInitializedError") and "rank(s) [1]" in missing[0], missing
