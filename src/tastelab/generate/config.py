"""``GenerateConfig``: what ``tastelab generate`` (and ``tune --external``) asks diffusers to make.

Why pydantic with ``allow_inf_nan=False`` and ``extra="forbid"``: the settings end up in every manifest row
and decide whether a resumed run may reuse an image, so a typo or a ``nan`` guidance must fail before any
model is loaded, naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tastelab.generate.schedulers import canonical_scheduler

__all__ = ["DTYPES", "GenerateConfig"]

DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")

Seed = Annotated[int, Field(ge=0, lt=2**63)]
Size = Annotated[int, Field(ge=8, le=8192)]


class GenerateConfig(BaseModel):
    """Settings of one generation run.

    ``base``: a Hugging Face id, a local pipeline folder (``model_index.json``) or one ``.safetensors`` /
    ``.ckpt`` checkpoint file (loaded with the pipeline class's ``from_single_file``; ``pipeline_class`` and
    ``single_file_config`` help when the class cannot be inferred or its configs are not cached).
    ``loras``: LoRA files, or folders whose ``*.safetensors`` are one checkpoint each (diffusers'
    ``checkpoint-N/pytorch_lora_weights.safetensors`` sub-folders too). ``include_base`` adds a ``base``
    checkpoint without any LoRA, as a reference. ``steps`` / ``guidance`` / ``width`` / ``height`` are the
    defaults for prompt lines that do not set ``--s`` / ``--l`` / ``--w`` / ``--h`` (``None``: the pipeline's
    own default, recorded in the manifest). ``seeds``: every prompt without ``--d`` is generated once per
    seed. ``device`` / ``dtype`` ``auto``: CUDA in bf16 where supported (else fp16), fp32 on the CPU.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    base: str = Field(min_length=1)
    loras: list[Path] = Field(default_factory=list)
    prompts: Path
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    out: Path
    lora_scale: float = Field(default=1.0, ge=-100, le=100)
    include_base: bool = False
    steps: Annotated[int, Field(ge=1, le=1000)] | None = None
    guidance: Annotated[float, Field(ge=0, le=100)] | None = None
    width: Size | None = None
    height: Size | None = None
    scheduler: str | None = None
    batch_size: int = Field(default=1, ge=1, le=1024)
    device: str = "auto"
    dtype: Literal[DTYPES] = "auto"  # type: ignore[valid-type]
    attention_slicing: bool = False
    cpu_offload: bool = False
    pipeline_class: str | None = None
    single_file_config: str | None = None
    progress: bool = False

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str | None) -> str | None:
        if name is None:
            return None
        return canonical_scheduler(name)

    @model_validator(mode="after")
    def _something_to_generate(self) -> GenerateConfig:
        if not self.loras and not self.include_base:
            raise ValueError("nothing to generate: give LoRA checkpoints (--lora) or include the base (--include-base)")
        return self
