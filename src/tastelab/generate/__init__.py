"""Generate sample images for every LoRA checkpoint with diffusers, in the layout the judge reads.

The package sits above ``inference`` and beside ``training`` (it imports core and io only; the judge, tuning
and the CLI may import it). Each module owns one step: the validated settings (config), which LoRA files are
checkpoints and in what order (checkpoints), the resumable manifest (manifest), scheduler names
(schedulers), the diffusers pipeline and its LoRA adapter (pipeline) and the loop that ties them together
(run: :func:`generate_samples`, and :class:`SampleGenerator`, which keeps the
loaded base across runs). Torch and diffusers load on first use. See docs/generate.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports

__all__ = ["GenerateConfig", "GenerateError", "GenerateResult", "SampleGenerator", "generate_samples"]

_LAZY: dict[str, str] = {
    "GenerateConfig": "tastelab.generate.config",
    "GenerateError": "tastelab.generate.run",
    "GenerateResult": "tastelab.generate.run",
    "SampleGenerator": "tastelab.generate.run",
    "generate_samples": "tastelab.generate.run",
}

if TYPE_CHECKING:
    from tastelab.generate.config import GenerateConfig
    from tastelab.generate.run import GenerateError, GenerateResult, SampleGenerator, generate_samples

__getattr__ = lazy_exports(__name__, _LAZY, globals())
