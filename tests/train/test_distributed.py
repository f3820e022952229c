"""The process group serves the loop's CPU reductions whatever the training device, and the loss is checked in
groups of steps, every process stopping alike and nothing past a non-finite loss saved."""

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

import selecsls
from selecsls.train import loop
from selecsls.train.distributed import Workers, backend_for
from selecsls.train.loop import TrainConfig, train
from selecsls.train.optimization import Optimization
from selecsls.train.state import TrainingDiverged
from training_fixtures import make_image_folder, narrow_spec


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_group_reduces_cpu_tensors_whatever_the_training_device(device):
    backends = BackendConfig(backend_for(torch.device(device))).get_device_backend_map()
    assert backends["cpu"] == "gloo"  # Workers.sum / all_agree: CPU float64
    if device == "cuda":
        assert backends["cuda"] == "nccl"  # DDP's gradients


@contextlib.contextmanager
def _group(device: torch.device, store, job_size: int = 2):
    """A process group as ``Workers.start`` makes it for ``device``, with this process its only member (so one
    process can test it), and the workers of a job of ``job_size`` processes as torchrun would describe them."""
    dist.init_process_group(backend_for(device), init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield Workers(0, job_size, device)
    finally:
        dist.destroy_process_group()


def _reductions(monkeypatch) -> list[str]:
    """The device of every tensor all-reduced from now on (the reduction still runs)."""
    reduced = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(
        dist, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor.device.type) or all_reduce(tensor, *a, **k)
    )
    return reduced


def _reduce_through_the_group(workers: Workers, monkeypatch) -> None:
    reduced = _reductions(monkeypatch)
    assert workers.sum([1.5, 2.0, -3.0]) == [1.5, 2.0, -3.0]
    assert workers.all_agree(True) and not workers.all_agree(False)
    assert reduced == ["cpu"] * 3


def test_sum_and_all_agree_reduce_through_a_cpu_group(tmp_path, monkeypatch):
    with _group(torch.device("cpu"), tmp_path / "store") as workers:
        _reduce_through_the_group(workers, monkeypatch)


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA device and NCCL")
def test_sum_and_all_agree_reduce_through_a_gpu_training_group(tmp_path, monkeypatch):
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    with _group(device, tmp_path / "store") as workers:
        _reduce_through_the_group(workers, monkeypatch)
        gradients = torch.ones(4, device=device)
        dist.all_reduce(gradients)  # what DDP reduces, through NCCL in the same group
        assert gradients.tolist() == [1.0] * 4


def test_a_lone_process_sums_its_own_values():
    workers = Workers(0, 1, torch.device("cpu"))
    assert workers.sum([1.0, 2.0]) == [1.0, 2.0] and workers.all_agree(True) and not workers.all_agree(False)


def test_a_lone_job_inside_a_group_someone_else_started_does_not_reduce_through_it(tmp_path, monkeypatch):
    """Its peers in that group are not training: a reduction would wait on them (or mix in their values)."""
    with _group(torch.device("cpu"), tmp_path / "store", job_size=1) as workers:
        reduced = _reductions(monkeypatch)
        assert workers.sum([1.0, 2.0]) == [1.0, 2.0] and workers.all_agree(True)
        assert reduced == []


def test_a_non_finite_loss_stops_at_the_next_check_naming_its_step_and_nothing_past_it_is_saved(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=4)  # 12 images: 3 steps of 4
    init = tmp_path / "init.pt"
    selecsls.save(selecsls.create_model(narrow_spec(), num_classes=3), init)
    step, calls = Optimization.step, []

    def second_loss_nan(self, images, targets):
        loss = step(self, images, targets)
        calls.append(loss.device.type)
        return torch.full_like(loss, math.nan) if len(calls) == 2 else loss

    monkeypatch.setattr(Optimization, "step", second_loss_nan)
    monkeypatch.setattr(loop, "LOSS_CHECK_INTERVAL", 10)  # no interval check within the epoch: the save checks
    config = TrainConfig(
        data=str(data), output=str(tmp_path / "run"), init=str(init), img_size=32, epochs=2, batch_size=4,
        workers=0, progress=False, save_every=1,
    )  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, batch 2: the loss is nan \(lr "):
        train(config)
    assert len(calls) == 2, "a step after the non-finite loss ran before the check"
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["position"]["global_step"] == 1 and math.isfinite(saved["position"]["loss_sum"])
    assert not (tmp_path / "run" / "best.pt").exists()
