"""Scheduler names -> diffusers scheduler classes (and their options), one registry.

Why a registry: ``--scheduler`` and the prompt files' ``--ss`` sampler name schedulers in sd-scripts' words
(``euler_a``, ``k_dpm_2``, ``dpmsolver++``) or diffusers' class names; both validate before any model loads
and every unknown name gets the same message with the valid names. A scheduler is always built from the
loaded pipeline's own scheduler config (``from_config``), so the noise schedule of the base is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tastelab.core.registry import Registry

__all__ = ["SCHEDULERS", "SchedulerSpec", "canonical_scheduler", "make_scheduler"]


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler class name and the config options that make it the named variant."""

    cls: str
    options: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: Registry[SchedulerSpec] = Registry("scheduler")

_ENTRIES: tuple[tuple[str, SchedulerSpec, tuple[str, ...]], ...] = (
    ("ddim", SchedulerSpec("DDIMScheduler"), ("DDIMScheduler",)),
    ("pndm", SchedulerSpec("PNDMScheduler"), ("PNDMScheduler",)),
    ("lms", SchedulerSpec("LMSDiscreteScheduler"), ("k_lms", "LMSDiscreteScheduler")),
    ("euler", SchedulerSpec("EulerDiscreteScheduler"), ("k_euler", "EulerDiscreteScheduler")),
    ("euler_a", SchedulerSpec("EulerAncestralDiscreteScheduler"), ("k_euler_a", "EulerAncestralDiscreteScheduler")),
    ("heun", SchedulerSpec("HeunDiscreteScheduler"), ("HeunDiscreteScheduler",)),
    ("dpm_2", SchedulerSpec("KDPM2DiscreteScheduler"), ("k_dpm_2", "KDPM2DiscreteScheduler")),
    ("dpm_2_a", SchedulerSpec("KDPM2AncestralDiscreteScheduler"), ("k_dpm_2_a", "KDPM2AncestralDiscreteScheduler")),
    ("dpmsolver", SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}), ()),
    ("dpmsolver++", SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
     ("dpm++2m", "DPMSolverMultistepScheduler")),
    ("dpm++2m_karras", SchedulerSpec("DPMSolverMultistepScheduler",
                                     {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}), ()),
    ("dpmsingle", SchedulerSpec("DPMSolverSinglestepScheduler"), ("DPMSolverSinglestepScheduler",)),
    ("unipc", SchedulerSpec("UniPCMultistepScheduler"), ("UniPCMultistepScheduler",)),
    ("flow_euler", SchedulerSpec("FlowMatchEulerDiscreteScheduler"), ("FlowMatchEulerDiscreteScheduler",)),
)
for _name, _spec, _aliases in _ENTRIES:
    SCHEDULERS.register(_name, aliases=_aliases)(_spec)


def canonical_scheduler(name: str) -> str:
    """The registered name for ``name`` (an alias or class name); ``UnknownNameError`` lists the valid ones."""
    return SCHEDULERS.canonical(name.strip())


def make_scheduler(name: str, current: Any) -> Any:
    """A new scheduler of the named kind built from ``current``'s config (the base pipeline's schedule)."""
    import diffusers  # heavy: torch + diffusers, only when a pipeline is loaded

    spec = SCHEDULERS.get(name)
    cls = getattr(diffusers, spec.cls)
    return cls.from_config(current.config, **spec.options)
