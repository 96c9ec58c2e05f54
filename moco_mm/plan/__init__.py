"""The memory planner: peak GPU memory of one training step, before the run.

    trace.py     measuring what a traced step holds (fake tensors, saved/live bytes)
    profiles.py  tower and model profiles (traced once per tower, cached)
    loss.py      the loss's footprint at exact sizes, and its bilinear fit
    planner.py   the phases, the margin, the plan and the largest batch / queue that fit
    measure.py   validation: what a real fp32 CPU step holds
    cli.py       `moco-mm plan-memory`

Imports: the base modules, `moco_mm.model` (it builds the real towers on the meta device)
and itself; never data, train, search, bench or cli. tests/test_layout.py checks this.
"""

from moco_mm.plan.loss import LossFootprint, loss_footprint, loss_model
from moco_mm.plan.measure import StepMeasurement, measure_step
from moco_mm.plan.planner import GPUS, GpuSpec, Margin, MemoryPlan, estimate_phases, plan, resolve_gpu
from moco_mm.plan.profiles import (
                                   PROFILE_VERSION,
                                   ModelProfile,
                                   autocast_dtype_for,
                                   default_vocab_size,
                                   profile_model,
                                   register_tower_profile,
                                   tower_profile,
                                   tower_profile_key,
)
from moco_mm.plan.trace import GIB, Linear, TowerProfile

__all__ = [
    "GIB", "Linear", "TowerProfile", "ModelProfile", "PROFILE_VERSION", "autocast_dtype_for",
    "default_vocab_size", "profile_model", "register_tower_profile", "tower_profile", "tower_profile_key",
    "LossFootprint", "loss_footprint", "loss_model", "GPUS", "GpuSpec", "Margin", "MemoryPlan",
    "estimate_phases", "plan", "resolve_gpu", "StepMeasurement", "measure_step",
]
