"""Training-free accelerators: schedulers that wrap any scheduler (`base.SchedulerWrapper`), one module each
(`timeshift`, `dualfast`, `teleport`)."""
