"""Guidance methods that turn several model outputs into the one prediction a solver consumes."""
