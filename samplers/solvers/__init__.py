"""Solver math and the diffusers schedulers built on it.

Pure float64 formula modules (`dpm_solver`, `deis`, `unipc`, `final_step`), the noise schedules and step grids
(`schedule`, `grids`, `flow`, `prediction`), the one diffusers adapter (`scheduler_base`, with `config_compat`),
one thin scheduler class per method (`dpmsolver_scheduler`, `deis_scheduler`, `unipc_scheduler`, `dc_solver`) and
the per-model step-grid tuner (`tune`).
"""
