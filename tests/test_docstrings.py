"""Every public function, class, method and property of the ``samplers`` and ``guidance`` packages has a docstring."""

import importlib
import inspect
import pkgutil
from types import ModuleType

import guidance
import samplers


def _modules(package: ModuleType) -> list[ModuleType]:
    """The package itself and every module inside it, sub-packages included."""
    return [package] + [importlib.import_module(info.name)
                        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]


def _undocumented(module: ModuleType) -> list[str]:
    """Public functions and classes defined in ``module``, and public methods defined in those classes, whose
    docstring (inherited ones count, as ``inspect.getdoc`` finds them) is missing or blank."""
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if obj.__module__ != module.__name__:
            continue
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj):
            missing += [f"{module.__name__}.{name}.{attr}" for attr, value in vars(obj).items()
                        if not attr.startswith("_") and _is_method(value)
                        and not (inspect.getdoc(inspect.getattr_static(obj, attr)) or "").strip()]
    return missing


def _is_method(value: object) -> bool:
    """Functions, properties, classmethods and staticmethods (not data attributes)."""
    return inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))


def test_public_api_has_docstrings():
    missing = [item for package in (samplers, guidance) for module in _modules(package)
               for item in _undocumented(module)]
    assert not missing, f"{len(missing)} public objects have no docstring:\n  " + "\n  ".join(missing)
