"""The CUDA paths of issue 13, exercised on a machine without a GPU.

What runs on a CPU runs for real (torch.compile with the eager backend, the EMA, the CLI's process
group); what needs CUDA is checked by faking the few `torch.cuda` functions the code asks, so each
test pins the decision the code makes (which device, which backend, pinned or not, how many copies).
The numbers themselves (speed, bf16 on real hardware, NCCL) still need a GPU: see issue 13.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_engine import make_store, tiny_cfg
from typer.testing import CliRunner

from cttrain import distributed
from cttrain.augment import DeviceAugment, upload
from cttrain.config import AugmentConfig, TrainingConfig, load_config
from cttrain.distributed import DistributedError
from cttrain.ema import ModelEMA
from cttrain.trainer import Trainer, compile_backbone, configure_determinism, resolve_amp

REPO = Path(__file__).resolve().parents[1]
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("cuda_paths") / "tiny.zarr")


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> list[torch.device]:
    """Pretend `count` GPUs are visible; returns the list of devices passed to set_device."""
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made_current.append(torch.device(device)))
    return made_current


# ------------------------------------------------------------------------- 1: compile and dropout
def test_a_full_dropout_ramp_compiles_the_backbone_once(store):
    from torch._dynamo.testing import CompileCounter

    ramp = {"model.dropout_start": 0.05, "model.dropout": 0.5, "model.dropout_warmup_epochs": 10}
    trainer = Trainer(tiny_cfg(store, **ramp), in_channels=3, num_labels=3, pos_freq=np.full(3, 0.5),
                      steps_per_epoch=1, ctx=distributed.setup("cpu"))
    x, y = torch.rand(2, 4, 3, 32, 32), torch.ones(2, 3)
    torch._dynamo.reset()
    whole = CompileCounter()  # control: the whole model, as before, recompiles on every new rate
    compiled = torch.compile(trainer.model, backend=whole)
    for epoch in range(3):
        trainer.set_epoch(epoch)
        compiled(x)
    assert whole.frame_count == 3

    torch._dynamo.reset()
    keys = list(trainer.model.state_dict())
    counter = CompileCounter()
    compile_backbone(trainer.model, backend=counter)
    rates = []
    for epoch in range(12):  # the whole ramp and past it
        rates.append(trainer.set_epoch(epoch))
        trainer.train_step(x, y, group=1, sync=True)
    torch._dynamo.reset()
    assert len(set(rates)) == 11                 # ten new rates on the ramp, then the final one
    assert counter.frame_count == 1              # ... and no recompile for any of them
    assert list(trainer.model.state_dict()) == keys    # compiled in place: checkpoint keys unchanged


# ------------------------------------------------------------------------------- 3: bf16 choice
def test_auto_amp_needs_native_bf16_on_the_training_device(monkeypatch):
    current = [0]

    class Device:  # torch.cuda.device(d): makes d current inside the block
        def __init__(self, device: torch.device) -> None:
            self.index = torch.device(device).index

        def __enter__(self) -> None:
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc: object) -> None:
            current[0] = self.previous

    native = {0: True, 1: False}  # GPU 0 an A100, GPU 1 a T4 that only emulates bf16

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native[current[0]]

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_amp("auto", CUDA0) == (torch.bfloat16, False)
    assert resolve_amp("auto", CUDA1) == (torch.float16, True)   # emulated bf16 is not chosen
    assert resolve_amp("bf16", CUDA1) == (torch.bfloat16, False)  # ... unless asked for
    assert current == [0]


# ------------------------------------------------------------------ 4: one asynchronous upload
def test_device_augment_copies_its_parameters_once_and_non_blocking(monkeypatch):
    copies: list[bool] = []
    real_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args):
            copies.append(bool(kwargs.get("non_blocking", False)))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    half = dict(p_affine=0.5, hflip=0.5, p_elastic=0.5, p_intensity=0.5, p_noise=0.5, p_blur=0.5)
    for kw in (half, {k: 1.0 for k in half}):
        aug = DeviceAugment(AugmentConfig(**kw))
        for seed in range(5):
            copies.clear()
            aug(torch.rand(4, 3, 3, 24, 20), torch.Generator().manual_seed(seed))
            assert copies == [True]  # every parameter and index of the batch in one copy


def test_upload_pins_for_cuda_only(monkeypatch):
    events: list[object] = []
    real_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            events.append(("copy", kwargs.get("non_blocking")))
            return self  # stands in for the device copy
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: events.append("pinned") or self)
    monkeypatch.setattr(torch.Tensor, "to", to)
    parts = {"idx": torch.tensor([0, 2, 3]), "theta": torch.rand(3, 2, 3, dtype=torch.float64)}
    out = upload(parts, CUDA0)
    assert events == ["pinned", ("copy", True)]  # pinned first, so the copy is really asynchronous
    assert torch.equal(out["idx"].long(), parts["idx"]) and torch.equal(out["theta"], parts["theta"].float())
    events.clear()
    upload(parts, torch.device("cpu"))
    assert events == []


# ------------------------------------------------------------------- 5, 8: which GPU, which group
def test_a_single_process_makes_its_gpu_current(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    made_current = fake_gpus(monkeypatch, 2)
    ctx = distributed.setup("cuda:1")  # what a `cv --devices 0,1` fold process is given
    assert ctx.device == CUDA1 and made_current == [CUDA1]
    with pytest.raises(DistributedError, match="only 2 GPU"):
        distributed.setup("cuda:2")
    made_current.clear()
    assert distributed.setup("cpu").device.type == "cpu" and made_current == []


def test_under_torchrun_the_local_rank_decides_the_gpu(monkeypatch):
    made_current = fake_gpus(monkeypatch, 2)
    backends: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: backends.append(kw["backend"]))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    for asked in ("cuda:0", "cuda", "auto"):
        ctx = distributed.setup(asked)
        assert ctx.device == CUDA1 and made_current[-1] == CUDA1 and backends[-1] == "nccl", asked

    made_current = fake_gpus(monkeypatch, 1)  # two ranks, one GPU: NCCL refuses, gloo shares it
    with pytest.raises(DistributedError, match="NCCL needs one GPU per process"):
        distributed.setup("cuda")
    ctx = distributed.setup("cuda", backend="gloo")
    assert ctx.device == CUDA0 and made_current == [CUDA0] and backends[-1] == "gloo"
    with pytest.raises(DistributedError, match="nccl needs CUDA"):
        distributed.setup("cpu", backend="nccl")
    assert load_config(None, ["training.ddp_backend=gloo"]).training.ddp_backend == "gloo"


# --------------------------------------------------------------------------- 6: speed on GPU
def test_gpu_configs_choose_speed_and_the_cpu_default_exact_resume():
    modes = {name: load_config(REPO / "configs" / f"{name}.yaml").training.deterministic
             for name in ("default", "ctrate", "demo")}
    assert modes == {"default": False, "ctrate": False, "demo": True} and TrainingConfig().deterministic
    try:
        configure_determinism(False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        configure_determinism(True)
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    finally:
        configure_determinism(True)


# ------------------------------------------------------------------- 7: the CLI leaves the group
def test_every_cli_exit_leaves_the_process_group(tmp_path, monkeypatch):
    from cttrain import cv
    from cttrain.cli import app
    from cttrain.trainer import TrainingError

    groups = itertools.count()

    def joins_then(outcome: Exception | None):
        def run_fold(*args: object, **kwargs: object) -> None:
            dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group{next(groups)}", rank=0,
                                    world_size=1)
            if outcome is not None:
                raise outcome
        return run_fold

    runner = CliRunner()
    try:
        for outcome, code in ((None, 0), (TrainingError("loss became nan"), 1), (RuntimeError("a bug"), 1)):
            monkeypatch.setattr(cv, "run_fold", joins_then(outcome))
            result = runner.invoke(app, ["fold", "0", "--folds", "5", "--out", str(tmp_path / "run"),
                                         "--set", "training.device=cpu"])
            assert result.exit_code == code, result.output
            assert not dist.is_initialized(), f"process group left joined after {outcome!r}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------- 10: fused EMA
def test_ema_is_one_foreach_lerp_per_update_and_matches_the_per_tensor_formula(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    ema = ModelEMA(model, 0.9)
    reference = copy.deepcopy(ema.module)
    calls: list[int] = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda a, b, w: calls.append(len(a)) or real(a, b, w))
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 8, 8))  # moves the BatchNorm statistics (buffers are copied)
        decay = min(0.9, (1 + step) / (10 + step))
        live, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        with torch.no_grad():
            for name, shadow in reference.named_parameters():
                shadow.lerp_(live[name], 1 - decay)
            for name, shadow in reference.named_buffers():
                shadow.copy_(buffers[name])
        ema.update(model)
    assert calls == [len(list(model.parameters()))] * 3
    for (name, a), b in zip(ema.module.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ 12: predict pins only for CUDA
def test_predict_pins_memory_only_for_a_cuda_device(store, tmp_path, monkeypatch):
    import cttrain.data
    from cttrain import predict

    predict.record_store(tmp_path / "run", store)
    cfg = tiny_cfg(store, **{"data.pin_memory": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host
    pinned: list[bool] = []
    monkeypatch.setattr(cttrain.data, "make_loader", lambda *a, **kw: pinned.append(kw["pin_memory"]))
    for device in (torch.device("cpu"), CUDA0):
        predict._loader(tmp_path / "run", cfg, store, [], None, device)
    assert pinned == [False, True]
