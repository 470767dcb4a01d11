"""Models with known answers: exact-score Gaussian and Gaussian-mixture models (`models`), their reference ODE
solutions (`reference`), and the shipped learned UNet of a 16-D mixture (`learned`)."""

from .models import ExactScoreModel, GaussianMixtureModel, GaussianModel, smooth_patterns

__all__ = ["ExactScoreModel", "GaussianMixtureModel", "GaussianModel", "smooth_patterns"]
