"""Tiny random Hugging Face encoders and VLMs saved as folders, for the judge's metric tests (``import tiny_judge``).

Each builder writes a complete, loadable checkpoint folder (config, weights, image processor, tokenizer when
the model has text) so tests go through the real ``hf:<folder>`` loading code. Tokenizers are word-level
over a small vocabulary (the ``tokenizers`` library), so no download is needed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "photo", "of", "dog", "cat", "sks", "red", "backpack", "on",
         "the", "beach", "in", "snow", "does", "this", "image", "show", ":", "?", "answer", "yes", "or", "no",
         "Yes", "No", ".", "Does", "Answer", "user", "assistant"]
VLM_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _word_tokenizer(special: list[str] | None = None, *, bos_eos: bool = True):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + (special or []))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if bos_eos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                          special_tokens=[("<bos>", 2), ("<eos>", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                       bos_token="<bos>", eos_token="<eos>")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", additional_special_tokens=special)


def _text(max_len: int = 16) -> dict:
    return {"vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": max_len}


def _vision() -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8}


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny CLIPModel (text + vision, projection 16) with its image processor and tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config={**_text(), "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0},
                     vision_config=_vision(), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A tiny SiglipModel with its image processor and tokenizer (texts padded to 16)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    SiglipModel(SiglipConfig(text_config=_text(), vision_config=_vision())).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_dino(folder: Path, seed: int = 0, model_type: str = "vit") -> Path:
    """A tiny ViTModel (``facebook/dino-vits16``'s class) or Dinov2Model, image processor, no tokenizer."""
    from transformers import AutoConfig, AutoModel, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in _vision().items()})
    AutoModel.from_config(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen2VLForConditionalGeneration + Qwen2VLProcessor (word-level tokenizer, Qwen-style template)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = _word_tokenizer(VLM_SPECIAL, bos_eos=False)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VLM_SPECIAL}
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": len(WORDS) + len(VLM_SPECIAL), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "bos_token_id": None,
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    with torch.no_grad():  # a random head near-uniform over 40 tokens: spread it so "Yes" is not ~1/40 always
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def judge_image(path: Path, sample_prompt: str | None = None):  # type: ignore[no-untyped-def]
    """A JudgeImage for a file (content hash as the judge computes it), optionally with a prompt."""
    from tastelab.judge.context import JudgeImage
    from tastelab.judge.samples import Sample

    sample = Sample(path=path, checkpoint="ckpt", prompt=sample_prompt)
    return JudgeImage(path=path, sha=hashlib.sha256(path.read_bytes()).hexdigest(), sample=sample)


def save_image(path: Path, img: Image.Image) -> Path:
    img.save(path)
    return path
