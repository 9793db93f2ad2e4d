"""The torch examples' --amp (bfloat16 autocast), ODC's --memory-dtype and --tensorboard.

Tiny runs (16 digits, one epoch) of each script: the options must change what they claim to
(the forward in bfloat16, the memory's dtype, an event file with metrics.jsonl's numbers)
and nothing else breaks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_runs import run_main, script

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

TINY = ["--subset", "16", "--resolution", "16", "--width", "8", "--batch-size", "8", "--no-progress", "--epochs", "1"]
ODC_TINY = [*TINY, "--clusters", "2", "--min-cluster-size", "4"]






def training_logit_dtypes(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record the dtype of the ODC head's logits at every training forward."""
    odc_script = script("imagenet_odc_torch")
    seen: list = []
    forward = odc_script.ODCNet.forward

    def spy(self, x):
        f, logits = forward(self, x)
        if self.training:
            seen.append(logits.dtype)
        return f, logits

    monkeypatch.setattr(odc_script.ODCNet, "forward", spy)
    return seen


def record(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_odc_amp_runs_the_forward_in_bfloat16_and_keeps_a_bfloat16_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = training_logit_dtypes(monkeypatch)
    out = tmp_path / "odc"
    run_main("imagenet_odc_torch", [*ODC_TINY, "--amp", "--memory-dtype", "bfloat16", "--out", str(out)])
    assert seen and set(seen) == {torch.bfloat16}
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["odc"]
    assert state["features"].dtype == torch.bfloat16
    assert state["sums"].dtype == torch.float64
    rec = record(out)
    assert rec["loss"] == rec["loss"] and 0 <= rec["nmi"] <= 1  # finite, scored


def test_odc_without_amp_trains_in_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = training_logit_dtypes(monkeypatch)
    out = tmp_path / "odc"
    run_main("imagenet_odc_torch", [*ODC_TINY, "--out", str(out)])
    assert set(seen) == {torch.float32}
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["odc"]
    assert state["features"].dtype == torch.float32


@pytest.mark.parametrize("name, net, extra", [
    ("imagenet_deepcluster_torch", "DeepClusterNet", ["--clusters", "2"]),
    ("imagenet_selfclassifier_torch", "SelfClassifierNet", ["--classes", "4", "--local-crops", "0"]),
])
def test_amp_trains_deepcluster_and_selfclassifier_under_bfloat16_autocast(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, net: str, extra: list[str]) -> None:
    cls = getattr(script(name), net)
    forward, autocast = cls.forward, []

    def spy(self, x):  # whether the training forward runs under bfloat16 autocast
        if self.training:
            autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, x)

    monkeypatch.setattr(cls, "forward", spy)
    out = tmp_path / "run"
    run_main(name, [*TINY, *extra, "--amp", "--out", str(out)])
    assert autocast and set(autocast) == {(True, torch.bfloat16)}
    rec = record(out)
    assert rec["epoch"] == 1 and rec["loss"] == rec["loss"] and rec["loss"] > 0


def test_tensorboard_writes_the_metrics_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "odc"
    run_main("imagenet_odc_torch", [*ODC_TINY, "--tensorboard", "--out", str(out)])
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rec = record(out)
    tags = set(events.Tags()["scalars"])
    assert {"loss", "nmi", "change_ratio"} <= tags
    (scalar,) = events.Scalars("loss")
    assert scalar.step == 1 and scalar.value == pytest.approx(rec["loss"], rel=1e-6)  # float32 event of a float64 record
