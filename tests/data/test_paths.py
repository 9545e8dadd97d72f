"""Data paths with ${NAME} taken from the environment, and what a missing one says."""

import pytest

from glassmetric.data.paths import resolve_data_path
from glassmetric.errors import ConfigError


def test_variables_are_replaced_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "birds").mkdir()
    monkeypatch.setenv("GLASSMETRIC_DATA_ROOT", str(tmp_path))
    assert resolve_data_path("${GLASSMETRIC_DATA_ROOT}/birds", "data.root") == tmp_path / "birds"
    assert resolve_data_path(str(tmp_path / "birds"), "data.root") == tmp_path / "birds"


def test_an_unset_variable_names_the_key_and_the_variable(monkeypatch):
    monkeypatch.delenv("GLASSMETRIC_DATA_ROOT", raising=False)
    with pytest.raises(ConfigError) as e:
        resolve_data_path("${GLASSMETRIC_DATA_ROOT}/cub50", "data.root")
    assert str(e.value) == (
        "data.root: ${GLASSMETRIC_DATA_ROOT}/cub50 needs the environment variable GLASSMETRIC_DATA_ROOT "
        "(the folder that holds the data sets): set GLASSMETRIC_DATA_ROOT, or set data.root to the data set's own path"
    )
    monkeypatch.setenv("GLASSMETRIC_DATA_ROOT", "")
    with pytest.raises(ConfigError, match="needs the environment variable GLASSMETRIC_DATA_ROOT"):
        resolve_data_path("${GLASSMETRIC_DATA_ROOT}/cub50", "data.root")


def test_a_missing_folder_names_the_key_and_where_the_variable_pointed(tmp_path, monkeypatch):
    monkeypatch.setenv("GLASSMETRIC_DATA_ROOT", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        resolve_data_path("${GLASSMETRIC_DATA_ROOT}/cub50", "data.root")
    assert str(e.value) == (
        f"data.root: {tmp_path / 'cub50'} not found (${{GLASSMETRIC_DATA_ROOT}}/cub50 with "
        f"GLASSMETRIC_DATA_ROOT={tmp_path}); set data.root to where it is"
    )
    with pytest.raises(
        ConfigError, match=r"^data\.test_root: .*nowhere not found; set data\.test_root to where it is$"
    ):
        resolve_data_path(str(tmp_path / "nowhere"), "data.test_root")
