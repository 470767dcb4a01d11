"""Guidance methods that turn several model outputs into the one prediction a solver consumes."""

from .base import GuidanceDriver, Guider
from .cfg import APG, CFG
from .fkc import FKC
from .loop import GuidedModel, GuidedSampleResult, guided_model, sample
from .pipeline import attach, attached_guider, detach

__all__ = [
    "APG",
    "CFG",
    "FKC",
    "GuidanceDriver",
    "GuidedModel",
    "GuidedSampleResult",
    "Guider",
    "attach",
    "attached_guider",
    "detach",
    "guided_model",
    "sample",
]
