"""Running a scheduler: the sampling loop (`loop`), its CUDA-graph capture (`graph`), and the check that the
project's `guidance` package is the one imported (`guidance_check`)."""
