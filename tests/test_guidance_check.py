"""The PyPI package also imported as ``guidance`` (LLM control) is detected and explained, not left to baffle."""

from __future__ import annotations

import sys
import warnings
from types import ModuleType

import pytest

import guidance
import samplers
from samplers.evaluation import sweep
from samplers.runtime import guidance_check


def fake_version(installed: dict[str, str]):
    def version(name: str) -> str:
        if name in installed:
            return installed[name]
        raise guidance_check.PackageNotFoundError(name)
    return version


def test_warns_with_the_fix_when_the_pypi_package_is_installed(monkeypatch):
    monkeypatch.setattr(guidance_check, "version", fake_version({"guidance": "0.2.1"}))
    with pytest.warns(UserWarning, match="the PyPI package 'guidance' 0.2.1 .*`pip uninstall guidance`"):
        guidance_check.warn_if_shadowed()


def test_silent_without_the_pypi_package(monkeypatch):
    monkeypatch.setattr(guidance_check, "version", fake_version({}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guidance_check.warn_if_shadowed()


def test_import_guidance_returns_ours_and_explains_a_foreign_package(monkeypatch):
    assert samplers.import_guidance() is guidance
    monkeypatch.setattr(guidance_check, "version", fake_version({"guidance": "0.2.1"}))
    monkeypatch.setitem(sys.modules, "guidance", ModuleType("guidance"))
    with pytest.raises(ImportError, match="found the PyPI package 'guidance' 0.2.1 .*not the guidance methods of "
                                          "diffusion-samplers. Both install a top-level `guidance` package"):
        samplers.import_guidance()
    with pytest.raises(sweep.SweepError, match="guidance\\[0\\]: `import guidance` found the PyPI package"):
        sweep.parse_grid({"guidance": [{"name": "cfg", "scale": 3.0}]})  # the grid check, before any sampling
