"""runtime.optim, runtime.engine, runtime.checkpoint: parameter groups, schedule, DeepSpeed
JSON, real DeepSpeed engines and checkpoints (single process, CPU, gloo)."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from torch import nn

from runtime.config import load_config
from runtime.dist import init_distributed
from runtime.checkpoint import CheckpointConfig, CheckpointManager
from runtime.engine import (DEEPSPEED_CONFIG_NAME, EngineConfig, NonFiniteLossError,
                            NonFiniteWeightsError, create_engine, deepspeed_config)
from runtime.optim import OptimConfig, WarmupCosine, param_groups
from runtime.preemption import PreemptionSignal


class ToyViT(nn.Module):
    """A tiny token model with the hooks the engine uses (no_weight_decay, layer ids)."""

    def __init__(self, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(0.2))
            for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def num_layers(self) -> int:
        return len(self.blocks) + 2

    def get_layer_id(self, name: str) -> int:
        if name.startswith(("embed", "pos_embed", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, 4, 8), y (B,) -> scalar MSE loss."""
        h = self.embed(x) + self.pos_embed
        for block in self.blocks:
            h = h + block(h)
        return (self.head(h.mean(1)).squeeze(-1).float() - y).pow(2).mean()


@pytest.fixture(scope="module", autouse=True)
def process_group():
    init_distributed()


def make_batches(n: int, seed: int = 0, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, batch, 4, 8, generator=gen)
    return [(x, x.sum(dim=(1, 2)) * 0.1) for x in xs]


def build(tmp_path, zero_stage=0, precision="fp32", grad_accum=1, seed=0, **optim):
    torch.manual_seed(seed)
    optim_cfg = OptimConfig(**{"base_lr": 0.05, "min_lr": 0.0, "warmup_epochs": 1.0, "epochs": 4,
                               "clip_grad": 1.0, **optim})
    engine_cfg = EngineConfig(precision=precision, zero_stage=zero_stage,
                              grad_accum_steps=grad_accum, max_nonfinite_in_row=3)
    return create_engine(ToyViT(), engine_cfg, optim_cfg, micro_batch_size=4, world_size=1,
                         out_dir=tmp_path, steps_per_epoch=2)


def train(engine, batches) -> list[float]:
    losses = []
    for x, y in batches:
        with engine.autocast():
            loss = engine(x.to(engine.device), y.to(engine.device))
        engine.step(loss)
        losses.append(loss.item())
    return losses


def eval_loss(engine, batches) -> float:
    """Mean loss over ``batches`` in eval mode (no dropout), without training."""
    engine.module.eval()
    with torch.no_grad():
        total = sum(engine(x.to(engine.device), y.to(engine.device)).item() for x, y in batches)
    engine.module.train()
    return total / len(batches)


# --- parameter groups and schedule ----------------------------------------------------


def test_param_groups_exclude_biases_norms_tokens_from_decay():
    model = ToyViT()
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"embed.weight", "blocks.0.1.weight", "blocks.1.1.weight", "head.weight"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["params"] and g["lr_scale"] == 1.0 for g in groups)


def test_param_groups_layer_decay_scales_and_frozen_params():
    model = ToyViT()
    model.head.bias.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {n: g["lr_scale"] for g in groups for n, p in model.named_parameters()
                if any(p is q for q in g["params"])}
    assert scale_of["head.weight"] == 1.0
    assert scale_of["blocks.1.1.weight"] == 0.5
    assert scale_of["blocks.0.0.bias"] == 0.25
    assert scale_of["embed.weight"] == scale_of["pos_embed"] == 0.125
    assert "head.bias" not in scale_of
    with pytest.raises(ValueError, match="get_layer_id"):
        param_groups(nn.Linear(2, 2), 0.05, layer_decay=0.75)


def test_warmup_cosine_shape():
    sched = WarmupCosine(base_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert sched.lr_at(0) == 0.0
    assert sched.lr_at(5) == pytest.approx(0.5)
    assert sched.lr_at(10) == pytest.approx(1.0)
    assert sched.lr_at(60) == pytest.approx(0.55)
    assert sched.lr_at(110) == pytest.approx(0.1) and sched.lr_at(500) == pytest.approx(0.1)
    tail = [sched.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(tail, tail[1:]))


# --- DeepSpeed JSON ---------------------------------------------------------------------


def test_deepspeed_config_from_typed_config_and_user_override(tmp_path):
    cfg = deepspeed_config(EngineConfig(precision="bf16", zero_stage=2, grad_accum_steps=4),
                           OptimConfig(clip_grad=3.0), micro_batch_size=8)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"] == {"stage": 2} and cfg["gradient_clipping"] == 3.0
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(EngineConfig(precision="bf16", zero_stage=0),
                                                OptimConfig(), 8)
    fp16 = deepspeed_config(EngineConfig(precision="fp16"), OptimConfig(), 8)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic loss scaling

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000},
                                "gradient_clipping": 0.5}))
    merged = deepspeed_config(EngineConfig(zero_stage=1, deepspeed_json=str(user)),
                              OptimConfig(), 8)
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert merged["gradient_clipping"] == 0.5

    for bad, match in (({"optimizer": {"type": "Adam"}}, "optimizer"),
                       ({"train_micro_batch_size_per_gpu": 3}, "conflicts")):
        user.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            deepspeed_config(EngineConfig(deepspeed_json=str(user)), OptimConfig(), 8)
    user.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json"):
        deepspeed_config(EngineConfig(deepspeed_json=str(user)), OptimConfig(), 8)


def test_engine_config_validation_names_the_field():
    with pytest.raises(ValueError, match="zero_stage"):
        load_config(EngineConfig, overrides=["zero_stage=3"])
    with pytest.raises(ValueError, match="warmup_epochs"):
        load_config(OptimConfig, overrides=["warmup_epochs=10", "epochs=5"])
    with pytest.raises(ValueError, match="keep_last"):
        load_config(CheckpointConfig, overrides=["keep_last=0"])


# --- engine -----------------------------------------------------------------------------


def test_engine_trains_with_scaled_lr_per_group(tmp_path):
    engine = build(tmp_path, layer_decay=0.5)
    written = json.loads((tmp_path / DEEPSPEED_CONFIG_NAME).read_text())
    assert written["zero_optimization"]["stage"] == 0
    peak = 0.05 * 4 / 256
    assert engine.schedule.base_lr == pytest.approx(peak)
    assert (engine.schedule.warmup_steps, engine.schedule.total_steps) == (2, 8)
    batches = make_batches(8)
    before = eval_loss(engine, batches)
    train(engine, batches * 3)
    assert engine.global_step == 24
    # The lr written into each group of the real optimizer is the schedule times lr_scale.
    last_lr = engine.schedule.lr_at(23)
    groups = engine.ds_engine.basic_optimizer.param_groups
    assert {g["lr_scale"] for g in groups} == {1.0, 0.5, 0.25, 0.125}
    for group in groups:
        assert group["lr"] == pytest.approx(last_lr * group["lr_scale"])
    # learnt: the training batches' loss without dropout (the training losses themselves
    # depend on torch's dropout stream, which differs between torch versions)
    assert eval_loss(engine, batches) < before  # 0.88-0.98x over seeds 0-5


def test_gradient_accumulation_steps_at_boundaries(tmp_path):
    engine = build(tmp_path, grad_accum=2)
    batches = make_batches(4)
    assert engine.schedule.base_lr == pytest.approx(0.05 * 8 / 256)
    applied = []
    for x, y in batches:
        engine.step(engine(x, y))
        applied.append(engine.last_step_applied)
    assert applied == [False, True, False, True] and engine.global_step == 2


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bf16_engine_steps_and_keeps_fp32_masters(tmp_path, zero_stage):
    engine = build(tmp_path, zero_stage=zero_stage, precision="bf16", layer_decay=0.5)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    losses = train(engine, make_batches(6))
    assert engine.global_step == 6 and all(math.isfinite(v) for v in losses)
    # DeepSpeed wraps the client AdamW (unfused fp16 / BF16 optimizer): the lr still arrives.
    for group in engine.ds_engine.basic_optimizer.param_groups:
        assert group["lr"] == pytest.approx(engine.schedule.lr_at(5) * group["lr_scale"])
    master = engine.master_state_dict()
    weight = master["embed.weight"]
    assert weight.dtype == torch.float32 and not torch.equal(weight, weight.bfloat16().float())
    torch.testing.assert_close(weight.bfloat16(), engine.module.embed.weight.detach())


def test_zero_stages_match_fp32(tmp_path):
    """ZeRO 0, 1 and 2 give the same fp32 losses (tolerance 1e-5 relative: only the order of
    floating-point reductions differs)."""
    runs = {stage: train(build(tmp_path / str(stage), zero_stage=stage), make_batches(6))
            for stage in (0, 1, 2)}
    assert runs[0][-1] != runs[0][0]
    for stage in (1, 2):
        assert runs[stage] == pytest.approx(runs[0], rel=1e-5, abs=1e-7)


def test_nonfinite_loss_is_skipped_counted_and_stops(tmp_path):
    engine = build(tmp_path)
    x, y = make_batches(1)[0]
    engine.step(engine(x, y))
    before = [p.detach().clone() for p in engine.module.parameters()]
    step = engine.global_step
    assert engine.step(engine(x, y) * float("nan")) is False
    assert engine.step(engine(x, y) * float("inf")) is False
    assert (engine.nonfinite_total, engine.nonfinite_in_row, engine.global_step) == (2, 2, step)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert engine.step(engine(x, y)) is True and engine.nonfinite_in_row == 0
    for _ in range(2):
        engine.step(engine(x, y) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="3 micro-batches in a row"):
        engine.step(engine(x, y) * float("nan"))
    assert engine.nonfinite_total == 5



def test_stop_signal_rides_on_the_step_collective(tmp_path, monkeypatch):
    """With the stop-signal handler attached (as ``open_loop`` does), each micro-batch runs one
    all-reduce carrying both the non-finite check and the stop flag, and ``requested()`` runs
    none of its own; without a step in between it still asks on its own."""
    import runtime.engine
    import runtime.preemption
    from runtime.dist import all_reduce_max, all_reduce_max_many

    collectives = []

    def counted(function):
        def wrapper(values):
            collectives.append(values)
            return function(values)
        return wrapper

    monkeypatch.setattr(runtime.engine, "all_reduce_max_many", counted(all_reduce_max_many))
    monkeypatch.setattr(runtime.preemption, "all_reduce_max", counted(all_reduce_max))
    engine = build(tmp_path, grad_accum=2)
    (x, y), (x2, y2) = make_batches(2)
    with PreemptionSignal(signals=(signal.SIGUSR1,)) as stop:
        engine.stop_signal = stop
        for _ in range(2):
            engine.step(engine(x, y))
        assert stop.requested() is False and engine.global_step == 1
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler sets the flag
        assert engine.step(engine(x2, y2) * float("nan")) is False  # still skipped
        for _ in range(2):
            engine.step(engine(x2, y2))
        assert stop.requested() is True and engine.global_step == 2
        assert collectives == [[0.0, 0.0]] * 2 + [[1.0, 1.0]] + [[0.0, 1.0]] * 2
        assert stop.requested() is True and collectives[-1] == 1.0  # no step since: its own


# --- checkpoints ------------------------------------------------------------------------


def test_checkpoint_resume_is_exact_and_pruned(tmp_path):
    batches = make_batches(8, seed=1)
    reference = build(tmp_path / "ref", zero_stage=1)
    torch.manual_seed(123)  # dropout stream
    expected = train(reference, batches)

    first = build(tmp_path / "a", zero_stage=1)
    manager = CheckpointManager(tmp_path / "a" / "ckpt", keep_last=2)
    torch.manual_seed(123)
    losses = []
    for i in range(0, 6, 2):
        losses += train(first, batches[i:i + 2])
        exported = manager.save(first, first.global_step, {"position": i + 2},
                                exports={"extra.txt": lambda p: p.write_text("x")})
    assert manager.complete_tags() == ["step_4", "step_6"]  # keep_last=2
    assert (exported / "extra.txt").read_text() == "x"
    assert (manager.dir / "latest").read_text() == "step_6"

    # An interrupted later save (no marker) is ignored by auto-resume.
    (manager.dir / "step_8").mkdir()
    assert manager.resolve("auto") == "step_6"
    with pytest.raises(ValueError, match="incomplete"):
        manager.resolve("step_8")
    with pytest.raises(FileNotFoundError):
        manager.resolve("step_99")
    assert manager.resolve("") is None

    torch.manual_seed(999)  # the RNG must come back from the checkpoint
    resumed = build(tmp_path / "b", zero_stage=1, seed=5)
    state = CheckpointManager(tmp_path / "a" / "ckpt").load(resumed, "step_6")
    assert state == {"position": 6} and resumed.global_step == 6
    losses += train(resumed, batches[6:])
    assert losses == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert manager.resolve(str(manager.dir / "step_6")) == str(manager.dir / "step_6")


def test_checkpoint_refuses_nonfinite_weights(tmp_path):
    engine = build(tmp_path)
    with torch.no_grad():
        next(engine.module.parameters())[0, 0] = float("nan")
    manager = CheckpointManager(tmp_path / "ckpt")
    with pytest.raises(NonFiniteWeightsError):
        manager.save(engine, 1, {})
    assert manager.complete_tags() == [] and not (tmp_path / "ckpt" / "step_1").exists()
