"""ONNX Runtime's two wheels (`onnxruntime`, `onnxruntime-gpu`) install the same module into the same folder, so
one environment must get exactly one: each is an extra of its own, and without either tidal says which to install."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from tidal.backends import factory
from tidal.cli import main
from tidal.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
WHEELS = {"onnxruntime", "onnxruntime-gpu"}


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def test_each_extra_brings_one_onnxruntime_wheel_and_the_base_none() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not _names(project["dependencies"]) & WHEELS
    extras = {name: _names(reqs) & WHEELS for name, reqs in project["optional-dependencies"].items()}
    assert extras["cpu"] == {"onnxruntime"}
    assert extras["gpu"] == {"onnxruntime-gpu"}
    assert all(len(wheels) <= 1 for wheels in extras.values()), extras


def test_make_installs_the_cpu_wheel() -> None:
    installs = re.findall(r"pip install .*-e '\.\[([a-z,]+)\]'", (ROOT / "Makefile").read_text())
    assert installs and all("cpu" in extras.split(",") for extras in installs), installs


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as it would be without either wheel: importing onnxruntime fails."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "tidal.backends.onnxruntime", raising=False)


@pytest.mark.usefixtures("no_onnxruntime")
def test_the_command_line_names_the_extras(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert f"ONNX Runtime is not installed: {sys.executable} -m pip install onnxruntime (tidal's cpu extra), or " \
           "onnxruntime-gpu (its gpu extra)" in capsys.readouterr().err


@pytest.mark.usefixtures("no_onnxruntime")
def test_a_model_load_names_the_extras() -> None:
    with pytest.raises(ConfigError, match=r"'onnxruntime' is not available.*install onnxruntime \(tidal's cpu extra\)"):
        factory("onnxruntime")
