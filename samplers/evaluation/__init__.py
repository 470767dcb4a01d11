"""Measuring samplers: Inception FID (`fid`, with verified downloads in `downloads`), per-sample error and pixel
Frechet distance (`quality`), and the sweep harness (`sweep`)."""
