"""Multi-process pretraining (two CPU processes over gloo): same updates as one process, resumable by one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ddae_core.checkpoint import latest_checkpoint
from ddae_core.config import TrainConfig
from ddae_core.training.loop import train

from toy_training import _fresh_accelerate_state, make_denoiser, make_images  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"

# Run by `accelerate launch`: every process trains; the main one prints what it saw.
_SCRIPT = """
import json, sys
import numpy as np
sys.path[:0] = [{tests!r}, {here!r}]
import test_multiprocess as M
from ddae_core.training.loop import train
result = train(M.make_denoiser(dropout=0.0), M.deterministic_loss, np.load({images!r}), M.config({steps}),
               out_dir={out!r}, progress=False)
from accelerate import PartialState
state = PartialState()
if state.is_main_process:
    print("RESULT " + json.dumps({{"processes": state.num_processes, "steps": [h["step"] for h in result.history]}}))
"""


def deterministic_loss(net, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A per-example loss with no randomness, so 1 and 2 processes must take identical steps."""
    t = torch.full((x0.shape[0],), 11, dtype=torch.long, device=x0.device)
    noise = torch.sin(3.0 * x0)  # fixed "noise": a function of the image
    return ((net(net.add_noise(x0, t, noise), t) - noise) ** 2).mean(dim=(1, 2, 3))


def config(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, grad_accum=2, lr=2e-3, warmup_steps=2, ema_decay=0.9,
                       hflip=False, checkpoint_every=2, keep_last=3, log_every=1, seed=1,
                       mixed_precision="no")  # fmt: skip


def launch_two_processes(tmp_path: Path, images: Path, steps: int, out: Path) -> dict:
    script = tmp_path / "train_two.py"
    here = Path(__file__).resolve().parent
    script.write_text(_SCRIPT.format(tests=str(here.parent), here=str(here), images=str(images), steps=steps, out=str(out)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}  # fmt: skip
    # `--cpu --num_processes 2` would start ONE process; CPU DDP (gloo) is --multi_gpu with ACCELERATE_USE_CPU
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-2000:]  # printed by the main process only
    return json.loads(lines[0].removeprefix("RESULT "))


def test_two_processes_match_one_and_resume_with_one(tmp_path):
    images = make_images(32)
    np.save(tmp_path / "images.npy", images)
    two = launch_two_processes(tmp_path, tmp_path / "images.npy", 4, tmp_path / "two")
    assert two == {"processes": 2, "steps": [1, 2, 3, 4]}
    ckpts = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]  # main process only
    assert json.loads((ckpts / "step-00000004" / "state.json").read_text())["num_processes"] == 2

    resumed = train(make_denoiser(dropout=0.0), deterministic_loss, images, config(6), out_dir=tmp_path / "two",
                    progress=False)  # fmt: skip
    assert [h["step"] for h in resumed.history] == [5, 6]  # continued from step 4 with one process
    assert json.loads((ckpts / "step-00000006" / "state.json").read_text())["num_processes"] == 1

    single = train(make_denoiser(dropout=0.0), deterministic_loss, images, config(6), out_dir=tmp_path / "one",
                   progress=False)  # fmt: skip
    for name in ("model.safetensors", "ema.safetensors"):
        mixed = load_file(str(ckpts / "step-00000006" / name))
        one = load_file(str(latest_checkpoint(tmp_path / "one" / "checkpoints") / name))
        for key in one:
            # reduction order differs (gloo all-reduce): ~1e-5, against ~2e-3 moved by one Adam step
            assert torch.allclose(mixed[key], one[key], rtol=0, atol=2e-5), f"{name}: {key}"
    start = make_denoiser(dropout=0.0).state_dict()
    assert any(not torch.allclose(start[k], one[k]) for k in one)  # training did move the weights
