"""This project's ``guidance`` package shares its import name with an unrelated PyPI package, ``guidance`` (a
language for controlling large language models). With both installed, one shadows the other (or, installed into
the same site-packages, their files mix), and the errors that follow name neither. `warn_if_shadowed` (run when
``samplers`` is imported) and `import_guidance` (used where this project needs its guiders) say what happened and
what to do.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

#: the distribution name of the unrelated PyPI package (ours is ``diffusion-samplers``)
OTHER_DISTRIBUTION = "guidance"
FIX = ("Both install a top-level `guidance` package, so only one can be imported. Use separate virtual environments, "
       "or `pip uninstall guidance` and then reinstall this project (`pip install --force-reinstall --no-deps -e .` "
       "in its checkout, or `pip install --force-reinstall --no-deps diffusion-samplers`) so its files are whole.")


def other_guidance_version() -> str | None:
    """The version of the PyPI ``guidance`` distribution if it is installed, else None."""
    try:
        return version(OTHER_DISTRIBUTION)
    except PackageNotFoundError:
        return None


def warn_if_shadowed() -> None:
    """A UserWarning naming the clash and the fix if the PyPI ``guidance`` distribution is installed."""
    other = other_guidance_version()
    if other is not None:
        warnings.warn(f"the PyPI package 'guidance' {other} (LLM control) is installed next to diffusion-samplers, "
                      f"whose guidance methods (CFG, APG, FKC) are also imported as `guidance`. {FIX}",
                      UserWarning, stacklevel=3)


def import_guidance() -> ModuleType:
    """Import this project's ``guidance`` package; ImportError naming the clash and the fix if the name resolves to
    another package."""
    module = importlib.import_module("guidance")
    if not all(hasattr(module, name) for name in ("GuidanceDriver", "Guider", "CFG", "APG")):
        other = other_guidance_version()
        found = f"the PyPI package 'guidance' {other}" if other else "another package"
        raise ImportError(f"`import guidance` found {found} at {getattr(module, '__file__', '?')}, not the guidance "
                          f"methods of diffusion-samplers. {FIX}")
    return module
