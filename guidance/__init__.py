"""Guidance methods that turn several model outputs into the one prediction a solver consumes."""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import GUIDERS, GuidanceDriver, Guider
from .cfg import APG, CFG, ClassifierFreeGuidedModel, classifier_free
from .fkc import FKC
from .loop import GuidedModel, GuidedSampleResult, guided_model, sample
from .pipeline import attach, attached_guider, detach

# Guiders register themselves on import (``registry_name``): every module here is imported, so a new guider module
# needs no line here to join GUIDERS and the sweep.
for _info in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "APG",
    "CFG",
    "ClassifierFreeGuidedModel",
    "FKC",
    "GUIDERS",
    "GuidanceDriver",
    "GuidedModel",
    "GuidedSampleResult",
    "Guider",
    "attach",
    "attached_guider",
    "classifier_free",
    "detach",
    "guided_model",
    "sample",
]
