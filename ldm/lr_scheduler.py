"""CompVis configs name `ldm.lr_scheduler.LambdaLinearScheduler`; the schedules live in ldm/optim/schedules.py."""
from ldm.optim.schedules import LambdaLinearScheduler  # noqa: F401
