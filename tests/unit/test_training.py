"""Pretraining loop, EMA, schedules and checkpoints: exact resume, overfitting, atomic files, signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ddae_core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_network,
    load_training_state,
    network_hash,
    save_network,
    save_training_state,
)
from ddae_core.config import DiffusionConfig, PipelineConfig, TrainConfig
from ddae_core.diffusion import build_denoiser, build_loss
from ddae_core.nn.unet import build_unet
from ddae_core.training.ema import EMA
from ddae_core.training.loop import TrainingInterrupted, global_batch_indices, local_micro_batches, train
from ddae_core.training.schedules import ema_decay_at, lr_factor

from toy_training import (  # noqa: F401 (the autouse fixture)
    DIFFUSION,
    _fresh_accelerate_state,
    make_denoiser,
    make_images,
    resume_config,
)

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- schedules (lr: test_schedules.py)


def test_ema_decay_ramps_then_caps_at_decay():
    assert [ema_decay_at(s, 0.9, "ramp") for s in (0, 8, 1000)] == pytest.approx([0.1, 0.5, 0.9])
    assert ema_decay_at(0, 0.9999, "none") == 0.9999
    with pytest.raises(ValueError, match="ema_warmup: unknown 'slow'"):
        ema_decay_at(0, 0.9, "slow")


class _OfficialEMA:
    """The decay the official DDAE code applies: ema-pytorch's ``EMA(beta, update_after_step=0, update_every=1)``,
    transcribed as a step counter (``update``: the first call copies; later ones use ``get_current_decay``)."""

    def __init__(self, beta: float, power: float = 2 / 3, inv_gamma: float = 1.0) -> None:
        self.beta, self.power, self.inv_gamma, self.step = beta, power, inv_gamma, 0

    def update(self) -> float:
        """The decay of this update (0.0: the weights are copied)."""
        step, self.step = self.step, self.step + 1
        if step <= 0:  # step <= update_after_step: copy
            return 0.0
        epoch = max(self.step - 0 - 1, 0.0)
        if epoch <= 0:
            return 0.0
        return min(1 - (1 + epoch / self.inv_gamma) ** -self.power, self.beta)


@pytest.mark.parametrize("profile", ["cifar10-ddpm", "cifar10-edm", "tiny-imagenet-edm"])
def test_the_paper_profiles_ema_decays_step_for_step_as_the_official_code(profile):
    import yaml

    settings = yaml.safe_load((REPO / "profiles" / f"{profile}.yaml").read_text())  # over the defaults
    train = PipelineConfig.from_dict(settings).pretrain.train
    official = _OfficialEMA(train.ema_decay)
    steps = [*range(2000), 31_622, 70_312, train.steps - 1]
    decays = {s: d for s, d in ((s, official.update()) for s in range(max(steps) + 1)) if s in steps}
    assert [ema_decay_at(s, train.ema_decay, train.ema_warmup) for s in steps] == pytest.approx(
        [decays[s] for s in steps], rel=1e-12, abs=1e-15)
    if train.ema_decay == 0.9999:  # the DDPM profile at epoch 800: still ~0.99945, never the configured 0.9999
        assert ema_decay_at(70_311, 0.9999, train.ema_warmup) == pytest.approx(0.99942, abs=1e-5)


# ----------------------------------------------------------------------------- EMA


class _WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor([0.1, 0.7]))  # constant float buffer
        self.register_buffer("count", torch.tensor(0))  # integer buffer


def test_ema_averages_params_and_buffers_in_fp32_and_round_trips():
    model = _WithBuffers().to(torch.bfloat16)
    ema = EMA(model)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    assert all(v.dtype == torch.float32 for k, v in ema.shadow.items() if k != "count")
    with torch.no_grad():
        model.lin.weight.add_(1.0)
        model.count.fill_(5)
    ema.update(model, 0.75)
    expected = 0.75 * start["lin.weight"] + 0.25 * model.lin.weight.float()
    assert torch.allclose(ema.shadow["lin.weight"], expected)
    assert torch.equal(ema.shadow["scale"], start["scale"])  # constant buffer stays bit-exact
    assert ema.shadow["count"].item() == 5

    target = _WithBuffers()
    ema.copy_to(target)
    assert torch.allclose(target.lin.weight, ema.shadow["lin.weight"])
    assert target.count.item() == 5
    target.load_state_dict(ema.state_dict())  # same keys as the model's own state_dict
    other = EMA(_WithBuffers())
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(KeyError):
        other.load_state_dict({"lin.weight": ema.shadow["lin.weight"]})


# ----------------------------------------------------------------------------- data order


def test_each_epoch_visits_every_image_once_and_processes_split_the_same_batch():
    n, batch = 10, 4  # batches straddle epoch ends
    stream = np.concatenate([global_batch_indices(7, s, batch, n) for s in range(5)])  # 2 epochs
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:])  # reshuffled per epoch

    indices = global_batch_indices(7, 3, 8, 50)
    single = local_micro_batches(indices, 2, 1, 0)
    shards = [local_micro_batches(indices, 2, 2, p) for p in range(2)]
    for m in range(2):
        assert sorted(np.concatenate([shards[0][m], shards[1][m]])) == sorted(single[m])


# ----------------------------------------------------------------------------- checkpoints


def _tiny_state(seed: int):
    model = nn.Linear(4, 3)
    torch.manual_seed(seed)
    nn.init.normal_(model.weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps=3))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, EMA(model), optimizer, scheduler


def test_training_state_round_trips_rotates_and_loads_weights_only(tmp_path):
    model, ema, optimizer, scheduler = _tiny_state(0)
    for step in (10, 20, 30):
        save_training_state(tmp_path, step, model=model, ema=ema, optimizer=optimizer,
                            lr_scheduler=scheduler, meta={"config": {"seed": 1}}, keep_last=2)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000030"]
    states = torch.load(tmp_path / "step-00000030" / "optimizer.pt", weights_only=True)
    assert states["lr_scheduler"]["last_epoch"] == 1 and "state" in states["optimizer"]

    fresh, fresh_ema, fresh_opt, fresh_sched = _tiny_state(1)
    meta = load_training_state(tmp_path / "step-00000030", model=fresh, ema=fresh_ema,
                               optimizer=fresh_opt, lr_scheduler=fresh_sched)  # fmt: skip
    assert meta["step"] == 30 and meta["config"] == {"seed": 1}
    assert torch.equal(fresh.weight, model.weight)
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], exp_avg)


def test_an_fp16_gradient_scalers_state_is_saved_and_restored_for_an_exact_resume(tmp_path, caplog):
    """fp16 training steps through a GradScaler: its scale and growth counter are part of the state."""
    model, ema, optimizer, scheduler = _tiny_state(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for overflow in (True, False, False):  # one overflow halves the scale; two clean steps count towards growth
        optimizer.zero_grad()
        loss = model(torch.randn(2, 4)).sum() * (float("inf") if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert (saved["scale"], saved["_growth_tracker"]) == (512.0, 2)  # not the initial state
    save_training_state(tmp_path, 7, model=model, ema=ema, optimizer=optimizer, lr_scheduler=scheduler,
                        meta={}, keep_last=1, scaler=scaler)
    restored = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    fresh, fresh_ema, fresh_opt, fresh_sched = _tiny_state(1)
    load_training_state(tmp_path / "step-00000007", model=fresh, ema=fresh_ema, optimizer=fresh_opt,
                        lr_scheduler=fresh_sched, scaler=restored)
    assert restored.state_dict() == saved

    save_training_state(tmp_path, 8, model=model, ema=ema, optimizer=optimizer, lr_scheduler=scheduler,
                        meta={}, keep_last=1)  # bf16/fp32: no scaler is written
    untouched = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_training_state(tmp_path / "step-00000008", model=fresh, ema=fresh_ema, optimizer=fresh_opt,
                        lr_scheduler=fresh_sched, scaler=untouched)
    assert untouched.get_scale() == 1024.0 and "holds no gradient-scaler state" in caplog.text


def test_latest_checkpoint_skips_temp_incomplete_and_corrupt_dirs(tmp_path):
    model, ema, optimizer, scheduler = _tiny_state(0)
    kwargs = dict(model=model, ema=ema, optimizer=optimizer, lr_scheduler=scheduler, meta={}, keep_last=5)
    save_training_state(tmp_path, 10, **kwargs)
    save_training_state(tmp_path, 20, **kwargs)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000020"
    (tmp_path / "step-00000040.tmp-99999").mkdir()  # a crash mid-write leaves a temp name
    shutil.copytree(tmp_path / "step-00000020", tmp_path / "step-00000045.old-99999")  # a crash mid-replace
    shutil.copytree(tmp_path / "step-00000020", tmp_path / "step-00000050")
    (tmp_path / "step-00000050" / "ema.safetensors").unlink()  # incomplete
    shutil.copytree(tmp_path / "step-00000020", tmp_path / "step-00000030")
    (tmp_path / "step-00000030" / "state.json").write_text('{"step": 30}')
    (tmp_path / "step-00000030" / "model.safetensors").write_bytes(b"\x00garbage")  # corrupt
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000020"
    (tmp_path / "step-00000020" / "optimizer.pt").write_bytes(b"not a torch file")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    assert latest_checkpoint(tmp_path / "missing") is None
    save_training_state(tmp_path, 60, **kwargs)  # rotation deletes what killed writers left
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_network_round_trip_gives_identical_outputs(tmp_path):
    denoiser = make_denoiser(seed=1, dropout=0.0)
    with torch.no_grad():  # ddpm-tiny zero-inits its output conv: perturb so outputs are not all zero
        for p in denoiser.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = save_network(tmp_path / "net", denoiser, {"diffusion": DIFFUSION, "network": "ddpm-tiny"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]  # no net.tmp-<pid> (nor net.old-<pid>)
    assert sorted(p.name for p in out.iterdir()) == ["network.json", "network.safetensors"]  # no .*.tmp-<pid>
    meta = json.loads((out / "network.json").read_text())
    assert meta["network"] == "ddpm-tiny" and meta["unet"]["resolution"] == 16

    loaded = load_network(out)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([1, 11, 500, 1000])
    with torch.no_grad():
        expected = denoiser.eval()(x, t)
        assert expected.abs().sum() > 0
        assert torch.equal(loaded(x, t), expected)
    assert len(network_hash(out)) == 64

    meta["unet"]["base_channels"] = 32  # config no longer matches the weights
    (out / "network.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="network.safetensors"):
        load_network(out)


def test_a_fraction_network_reloads_reading_t_over_T_and_an_older_file_reads_scaled(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("ddpm-tiny", in_channels=1, resolution=16, zero_init_output=False)
    fraction = build_denoiser(DiffusionConfig(noise_label="fraction"), unet).eval()
    out = save_network(tmp_path / "net", fraction, {"diffusion": DiffusionConfig(noise_label="fraction")})
    meta = json.loads((out / "network.json").read_text())
    assert meta["noise_label"] == meta["diffusion"]["noise_label"] == "fraction"
    loaded = load_network(out)
    assert loaded.label_kind == "fraction"
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([11, 900])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), fraction(x, t))
        scaled = build_denoiser(DiffusionConfig(), unet).eval()
        assert not torch.allclose(scaled(x, t), fraction(x, t))  # the label really changes what it computes
    del meta["noise_label"], meta["diffusion"]["noise_label"]  # a network.json from before the key
    (out / "network.json").write_text(json.dumps(meta))
    assert load_network(out).label_kind == "scaled"


# ----------------------------------------------------------------------------- the loop

_RESUME_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import toy_training as T
from ddae_core.diffusion import build_loss
from ddae_core.training.loop import train
import torch
images = np.load({images!r}, mmap_mode="r")
denoiser = T.make_denoiser()
torch.manual_seed(12345)  # the global RNG must not matter: the loop seeds dropout itself
result = train(denoiser, build_loss(T.DIFFUSION), images, T.resume_config({steps}),
               out_dir={out!r}, progress=False)
print(json.dumps([h["step"] for h in result.history]))
"""


def _run_in_fresh_process(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_resume_in_a_fresh_process_equals_an_uninterrupted_run(tmp_path):
    images = make_images(64)
    np.save(tmp_path / "images.npy", images)
    loss = build_loss(DIFFUSION)
    straight = train(make_denoiser(), loss, images, resume_config(20), out_dir=tmp_path / "a", progress=False)
    assert straight.step == 20

    train(make_denoiser(), loss, images, resume_config(10), out_dir=tmp_path / "b", progress=False)
    script = _RESUME_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), images=str(tmp_path / "images.npy"),
                                   steps=20, out=str(tmp_path / "b"))  # fmt: skip
    logged_steps = json.loads(_run_in_fresh_process(script).strip().splitlines()[-1])
    assert logged_steps == [15, 20]  # it resumed at 10 rather than starting over

    a, b = tmp_path / "a" / "checkpoints" / "step-00000020", tmp_path / "b" / "checkpoints" / "step-00000020"
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000015", "step-00000020"]
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key], rtol=1e-5, atol=1e-6), f"{name}:{key}"
    first = load_file(str(tmp_path / "a" / "checkpoints" / "step-00000015" / "model.safetensors"))
    assert any(not torch.allclose(first[k], wa[k]) for k in first)  # the last steps did change weights
    ema_net = straight.ema_denoiser.state_dict()
    ema_file = load_file(str(a / "ema.safetensors"))
    assert ema_net.keys() == ema_file.keys() and all(torch.equal(ema_net[k], ema_file[k]) for k in ema_net)

    again = train(make_denoiser(seed=5), loss, images, resume_config(20), out_dir=tmp_path / "a", progress=False)
    assert again.step == 20 and again.history == []  # already complete: loads, trains nothing
    assert all(torch.equal(again.ema_denoiser.state_dict()[k], ema_file[k]) for k in ema_net)


def test_tiny_unet_overfits_64_images(tmp_path):
    config = TrainConfig(steps=60, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99,
                         hflip=False, checkpoint_every=1000, log_every=1, seed=0, mixed_precision="no")  # fmt: skip
    result = train(make_denoiser(dropout=0.0), build_loss(DIFFUSION), make_images(64), config,
                   out_dir=tmp_path, progress=False)  # fmt: skip
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 60
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-00000060"  # saved at the end


def test_sigterm_finishes_the_step_saves_and_raises(tmp_path):
    calls = []

    def send_sigterm(step: int, metrics: dict) -> None:
        calls.append((step, metrics))
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    from accelerate import Accelerator

    config = TrainConfig(steps=50, batch_size=8, grad_accum=2, lr=1e-3, warmup_steps=0, ema_decay=0.9999,
                         mixed_precision="no", checkpoint_every=100, log_every=1)  # fmt: skip
    accelerator = Accelerator(cpu=True)  # made by the caller without accumulation: train sets it
    with pytest.raises(TrainingInterrupted) as info:
        train(make_denoiser(), build_loss(DIFFUSION), make_images(16), config, out_dir=tmp_path,
              accelerator=accelerator, callbacks=[send_sigterm], progress=False)  # fmt: skip
    assert accelerator.gradient_accumulation_steps == 2
    assert info.value.step == 3 and [s for s, _ in calls] == [1, 2, 3]
    assert set(calls[0][1]) == {"loss", "lr", "images_per_s", "epoch"}
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path is not None and path.name == "step-00000003"
    fresh = make_denoiser(seed=9)
    optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    meta = load_training_state(path, model=fresh, ema=EMA(fresh), optimizer=optimizer, lr_scheduler=scheduler)
    assert meta["step"] == 3 and meta["config"]["steps"] == 50


def test_network_hash_of_a_missing_network_names_the_file(tmp_path):
    (tmp_path / "network").mkdir()
    with pytest.raises(CheckpointError, match=r"network/network.safetensors not found: run the pretrain stage"):
        network_hash(tmp_path / "network")
