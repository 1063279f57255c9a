"""resolve_root: the one way the CLI, the flows and the stages find the repository."""

from __future__ import annotations

import pytest

from tasks.services.outputs.paths import resolve_root


def test_an_explicit_root_must_hold_params_yaml(tmp_path):
    (tmp_path / "repo").mkdir()
    with pytest.raises(FileNotFoundError, match=r"repo: no params.yaml here"):
        resolve_root(tmp_path / "repo")
    (tmp_path / "repo" / "params.yaml").write_text("{}\n")
    assert resolve_root(str(tmp_path / "repo")) == (tmp_path / "repo").resolve()


def test_without_one_the_nearest_params_yaml_above_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    assert resolve_root() == tmp_path.resolve()
    assert resolve_root(None) == resolve_root("") == tmp_path.resolve()  # an unset --repo or $DDAE_REPO


def test_no_params_yaml_anywhere_up_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if any((parent / "params.yaml").is_file() for parent in (tmp_path, *tmp_path.parents)):
        pytest.skip("a params.yaml above the tmp directory")
    with pytest.raises(FileNotFoundError, match="no params.yaml found in"):
        resolve_root()
