"""bench/gpu_check.py's arithmetic and settings: the peak it divides by, MFU, and a slice ddae run accepts.

The whole check (every part at toy scale, the pipeline slice included) is ``bash bench/gpu_check.sh
--dry-run`` (~2 min on two cores): a script run by hand, not a test.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from flows.cli import parse_overrides
from tasks.services.params.overrides import overridden_params
from tasks.services.params.profiles import apply_profile

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_the_peak_comes_from_the_table_by_name_unless_overridden():
    assert gpu_check.nominal_peak("NVIDIA H200", env={}) == pytest.approx(989.4)
    assert gpu_check.nominal_peak("NVIDIA H100 PCIe", env={}) == pytest.approx(756.0)
    assert gpu_check.nominal_peak("NVIDIA A100-SXM4-80GB", env={}) == pytest.approx(312.0)
    assert gpu_check.nominal_peak("Some Future GPU", env={}) is None
    assert gpu_check.nominal_peak("NVIDIA H200", env={gpu_check.PEAK_ENV: "500"}) == 500.0


def test_mfu_is_achieved_over_peak():
    assert gpu_check.mfu(98.94, 989.4) == pytest.approx(0.1)
    assert gpu_check.mfu(98.94, None) is None


@pytest.mark.parametrize("dry_run", [True, False])
def test_the_slices_overrides_validate_on_the_cifar10_ddpm_profile(tmp_path, dry_run):
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    apply_profile(tmp_path / "params.yaml", "cifar10-ddpm")
    source = {"data.dataset": "imagefolder", "data.source": str(tmp_path)}
    overrides = gpu_check.slice_overrides(dry_run, 40, source)
    sets = [f"{key}={value}" for key, value in overrides.items()]  # as `ddae run --set` receives them
    _data, config = overridden_params(tmp_path / "params.yaml", parse_overrides(sets))
    assert config.pretrain.train.steps == 40 and config.probe.online and config.probe.online_epochs == 1
    assert config.pretrain.network.name == ("ddpm-tiny" if dry_run else "ddpm-35m")  # the profile's, for real
    assert config.pretrain.train.mixed_precision == ("no" if dry_run else "auto")  # the profile's: bf16 on a GPU that has it
