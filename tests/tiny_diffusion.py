"""A tiny random Stable Diffusion pipeline and LoRA files for it, built offline (``import tiny_diffusion``).

The pipeline is a real ``StableDiffusionPipeline`` (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a
CLIPTokenizer over a character vocabulary written here, DDIM) saved with ``save_pretrained``, so tests go
through the real folder loading, LoRA loading (kohya and PEFT keys) and call code. Images are 16 x 16.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

SIZE = 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _tokenizer_files(folder: Path) -> tuple[Path, Path, int]:
    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt", len(vocab)


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """A tiny random StableDiffusionPipeline saved in ``folder`` (loadable by folder, offline)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges, n = _tokenizer_files(folder.parent / f".{folder.name}-tokenizer")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=32, sample_size=SIZE)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=n - 2,
                                        eos_token_id=n - 1, pad_token_id=n - 1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=4)
def _attention_linears(pipe_folder: Path) -> dict[str, tuple[int, int]]:
    """UNet attention projection name -> (in_features, out_features) of the saved tiny pipeline."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipe_folder / "unet")
    return {name: (m.in_features, m.out_features) for name, m in unet.named_modules()
            if any(name.endswith("." + t) for t in LORA_TARGETS)}


def write_kohya_lora(pipe_folder: Path, path: Path, seed: int, *, rank: int = 4, strength: float = 0.5,
                     in_features: int | None = None) -> Path:
    """A kohya-ss format LoRA (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``)
    for the tiny UNet's attention projections; ``in_features`` forces a wrong shape (a LoRA of another base)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in _attention_linears(pipe_folder).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_features or fan_in, generator=g) * strength
        tensors[f"{key}.lora_up.weight"] = torch.randn(fan_out, rank, generator=g) * strength
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_peft_lora(pipe_folder: Path, path: Path, seed: int, *, rank: int = 4, strength: float = 0.5) -> Path:
    """A diffusers-format LoRA (PEFT keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``), as diffusers'
    training scripts save it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in _attention_linears(pipe_folder).items():
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * strength
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * strength
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
