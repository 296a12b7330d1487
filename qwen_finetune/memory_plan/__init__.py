"""Memory and time plan of a training run, before any weight is loaded (`finetune.py --plan`).

plan.py puts it together: run_setup.py describes the run, shapes.py counts parameters, activations.py
and memory.py give the bytes per device, step_time.py the FLOPs and time at devices.py's peak,
suggestions.py the changes that would make a run fit, formatting.py the text.
"""

from .devices import Device, detect_device, device_by_name
from .plan import RunPlan, fits, plan_run, plan_setup
from .run_setup import PreferenceSetup, TrainingSetup, ZeroSetup, setup_from_args
from .shapes import AdapterShape, ModelShape
from .suggestions import Suggestion

__all__ = [
    "AdapterShape",
    "Device",
    "ModelShape",
    "PreferenceSetup",
    "RunPlan",
    "Suggestion",
    "TrainingSetup",
    "ZeroSetup",
    "detect_device",
    "device_by_name",
    "fits",
    "plan_run",
    "plan_setup",
    "setup_from_args",
]
