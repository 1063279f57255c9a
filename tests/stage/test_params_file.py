"""params.yaml written by ddae (overrides, profiles): comments, order and layout kept; refusals change nothing."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
import yaml

from ddae_core.config import ConfigError
from tasks.services.params.editing import Setting, planned_text
from tasks.services.params.loading import load_params
from tasks.services.params.overrides import apply_overrides

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def params(tmp_path: Path) -> Path:
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path / "params.yaml"


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """(lines removed, lines added) between two texts."""
    diff = list(difflib.ndiff(before.splitlines(), after.splitlines()))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


def test_the_shipped_params_yaml_round_trips_byte_for_byte(params):
    text = params.read_text()
    assert planned_text(text, [])[0] == text


def test_an_override_changes_its_own_line_only_and_keeps_the_comment(params):
    before = params.read_text()
    apply_overrides(params, {"pretrain.train.steps": 20, "extract.pools": [1]})
    removed, added = changed_lines(before, params.read_text())
    assert removed == [
        "    steps: 0                 # 0 = planned: epochs x train images, kept within [min_images, max_images] images seen",
        "  pools: [1, 4]              # 1 = global average pooling (paper); k = k x k average pooling (4: a 4x4 grid keeps",
    ]
    assert added == [
        "    steps: 20                # 0 = planned: epochs x train images, kept within [min_images, max_images] images seen",
        "  pools: [1]                 # 1 = global average pooling (paper); k = k x k average pooling (4: a 4x4 grid keeps",  # inline stays
    ]
    config = load_params(params)
    assert config.pretrain.train.steps == 20 and config.extract.pools == (1,)


def test_a_new_key_joins_the_end_of_its_section_before_the_blank_line(params):
    # params.yaml lists every key; a file without two of them (an older one, a user's) gets them added
    shipped = params.read_text().splitlines(keepends=True)
    before = "".join(line for line in shipped if not line.lstrip().startswith(("sigma_indices:", "hflip:")))
    assert len(shipped) - len(before.splitlines()) == 2
    params.write_text(before)
    apply_overrides(params, {"extract.sigma_indices": [], "pretrain.train.hflip": True})
    after = params.read_text()
    removed, added = changed_lines(before, after)
    assert removed == [] and added == ["    hflip: true", "  sigma_indices: []"]
    assert "the served model reads alike\n  sigma_indices: []\n\nprobe:\n" in after  # after the last key's comment
    assert list(yaml.safe_load(after)["extract"])[-1] == "sigma_indices"


def test_a_refused_override_leaves_the_file_byte_identical(params):
    before, mtime = params.read_bytes(), params.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"pretrain.train.steps: must be >= 0 \(0 = planned from epochs\), got -1"):
        apply_overrides(params, {"pretrain.train.lr": 0.1, "pretrain.train.steps": -1})
    with pytest.raises(ConfigError, match=r"data.colour: unknown key"):
        apply_overrides(params, {"data.colour": "red"})
    with pytest.raises(ConfigError, match=r"pretrain.train.lr: is a value, not a section"):
        apply_overrides(params, {"pretrain.train.lr.x": 1})
    assert params.read_bytes() == before and params.stat().st_mtime_ns == mtime
    assert list(params.parent.iterdir()) == [params]  # no temporary file left either


@pytest.mark.parametrize("value", ["no", "on", "1e-4", "0x10", "010", "2024-01-01", "", "null", "1_000"])
def test_strings_are_written_so_the_stages_read_them_back_as_strings(params, value):
    apply_overrides(params, {"data.source": value})
    assert yaml.safe_load(params.read_text())["data"]["source"] == value
    assert load_params(params).data.source == value


def test_numbers_and_nulls_read_back_as_set(params):
    apply_overrides(params, {"pretrain.train.lr": 1e-05, "probe.l2_grid": [1e-06, 0.5], "pretrain.network.dropout": None})
    data = yaml.safe_load(params.read_text())
    assert data["pretrain"]["train"]["lr"] == 1e-05 and data["probe"]["l2_grid"] == [1e-06, 0.5]
    assert "dropout" in data["pretrain"]["network"] and data["pretrain"]["network"]["dropout"] is None
    assert load_params(params).pretrain.train.lr == 1e-05


def test_an_equal_value_keeps_its_spelling(params):
    before = params.read_text()
    apply_overrides(params, {"data.source": "", "probe.l2_grid": [0.00001, 0.0001, 0.001], "extract.levels": [11]})
    assert params.read_text() == before  # `source: ""` and `[0.00001, ...]` untouched, nothing rewritten


def test_a_duplicated_key_is_refused_naming_it_and_nothing_is_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  max_train: 1\n  max_train: 2\n")  # PyYAML would silently take the last; DVC refuses
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"(?s)params.yaml: not valid YAML: .*duplicate key \"max_train\""):
        apply_overrides(path, {"data.max_test": 5})
    assert path.read_bytes() == before


def test_stages_read_params_as_dvc_does_even_after_dvc_rewrites_them(params):
    """`dvc exp run -S` rewrites params.yaml with YAML 1.2 (``'no'`` loses its quotes): still the string."""
    from dvc.utils.serialize import load_yaml, modify_yaml

    apply_overrides(params, {"pretrain.train.mixed_precision": "no"})
    with modify_yaml(params) as data:  # what `dvc exp run -S pretrain.train.lr=0.0001` does to the file
        data["pretrain"]["train"]["lr"] = 0.0001
    assert "    mixed_precision: no " in params.read_text()  # unquoted now: YAML 1.1 would read false
    config = load_params(params)
    assert (config.pretrain.train.mixed_precision, config.pretrain.train.lr) == ("no", 0.0001)
    dvc_view = load_yaml(params)["pretrain"]["train"]
    assert (dvc_view["mixed_precision"], dvc_view["lr"]) == ("no", 0.0001)
    params.write_text(params.read_text().replace("lr: 0.0001", "lr: 1e-4"))  # a number in YAML 1.2, as DVC reads it
    assert load_params(params).pretrain.train.lr == 0.0001


def test_setting_comments_and_a_new_section(tmp_path):
    text = "a:\n  b: 1      # old\n\n# closing words\n"
    new, data = planned_text(text, [Setting("a.b", 2, "# new"), Setting("c.d", [1, 2])])
    assert new == "a:\n  b: 2      # new\nc:\n  d: [1, 2]\n\n# closing words\n"  # what ended the file still does
    assert data == {"a": {"b": 2}, "c": {"d": [1, 2]}}
