"""Judge metrics: the :data:`METRICS` registry (name -> metric class, lazy) and what each declares.

Each entry's metadata holds its :class:`~tastelab.judge.metrics.base.MetricInfo` under ``"info"`` (family,
inputs, direction, bounds, default normalisation and its calibration, licence of the default weights, the
extra that installs it), readable without importing the metric's module, so optional dependencies load
only when a metric runs. A plugin registers its own with ``METRICS.register("name", info=MetricInfo(...))``.
Each family's entries live in one block below, next to the module that implements them.
"""

from __future__ import annotations

from tastelab.core.registry import Registry
from tastelab.judge.metrics.base import FAMILIES, Metric, MetricInfo, MetricUnavailable

__all__ = ["FAMILIES", "METRICS", "Metric", "MetricInfo", "MetricUnavailable", "metric_info"]

METRICS: Registry = Registry("judge metric")


def metric_info(name: str) -> MetricInfo:
    """The declared :class:`MetricInfo` of a registered metric (no import of its module)."""
    info: MetricInfo = METRICS.metadata(name)["info"]
    return info


_CLIP_L14 = "openai/clip-vit-large-patch14"
_DINO_S16 = "facebook/dino-vits16"

# ---------------------------------------------------------------------------------------------- alignment
METRICS.register_lazy("clip_t", "tastelab.judge.metrics.alignment:ClipTextSimilarity", info=MetricInfo(
    default_model=_CLIP_L14,
    family="alignment", inputs=("image", "prompt"), bounds=(-1.0, 1.0), normalisation=(0.15, 0.40),
    calibration="CLIP ViT-L/14 cosine: unrelated text ~0.15, DreamBooth's CLIP-T 0.305; per-encoder ranges "
                "in the metric", licence="MIT (OpenAI CLIP) / Apache-2.0 (SigLIP)",
    description="prompt-image cosine similarity of a CLIP / SigLIP text and image embedding"))
METRICS.register_lazy("vqa_score", "tastelab.judge.metrics.alignment:VQAScore", info=MetricInfo(
    default_model="Qwen/Qwen2-VL-2B-Instruct", enabled=False, default_options={"trust_remote_code": False},
    family="alignment", inputs=("image", "prompt"), bounds=(0.0, 1.0), normalisation=(0.0, 1.0),
    licence="that of the chosen VLM", description='P("Yes") from a VLM asked "Does this image show: {prompt}?"'))

# -------------------------------------------------------------------------------------------- consistency
METRICS.register_lazy("dino", "tastelab.judge.metrics.consistency:DinoSimilarity", info=MetricInfo(
    default_model=_DINO_S16,
    family="consistency", inputs=("image", "references"), bounds=(-1.0, 1.0), normalisation=(0.2, 0.9),
    calibration="DINO ViT-S/16 mean cosine to the references: DreamBooth real photos of one subject 0.774, "
                "DreamBooth samples 0.668", licence="Apache-2.0 (DINO)",
    description="mean cosine similarity of the image's DINO embedding to the reference images'"))
METRICS.register_lazy("clip_i", "tastelab.judge.metrics.consistency:ClipImageSimilarity", info=MetricInfo(
    default_model=_CLIP_L14,
    family="consistency", inputs=("image", "references"), bounds=(-1.0, 1.0), normalisation=(0.5, 1.0),
    calibration="CLIP mean cosine to the references: DreamBooth real photos 0.885, samples 0.803",
    licence="MIT (OpenAI CLIP)", description="mean cosine similarity of CLIP image embeddings to the references"))
METRICS.register_lazy("face_distance", "tastelab.judge.metrics.consistency:FaceIdentity", info=MetricInfo(
    default_model="dlib",
    family="consistency", inputs=("image", "references"), direction="lower", bounds=(0.0, 2.0),
    normalisation=(0.3, 0.8), calibration="dlib 128-d face descriptor distance; same person < 0.6 (dlib)",
    licence="CC0 (dlib face recognition models)", extra="faces",
    description="distance of the largest face's dlib descriptor to the references' (missing when no face)"))

# --------------------------------------------------------------------------------------------- aesthetics
METRICS.register_lazy("aesthetic", "tastelab.judge.metrics.aesthetics:TastelabAesthetic", info=MetricInfo(
    enabled=False,
    family="aesthetics", inputs=("image",), bounds=(1.0, 10.0), normalisation=(1.0, 10.0),
    licence="that of the chosen tastelab model", description="score 1..10 of a tastelab model folder or preset"))
METRICS.register_lazy("hf_aesthetic", "tastelab.judge.metrics.aesthetics:HFClassifierAesthetic", info=MetricInfo(
    default_model="cafeai/cafe_aesthetic", enabled=False,
    family="aesthetics", inputs=("image",), bounds=(0.0, 1.0), normalisation=(0.0, 1.0),
    licence="that of the chosen Hugging Face model",
    description="probability of the 'aesthetic' label of a Hugging Face image-classification model"))

# ------------------------------------------------------------------------------------- technical quality
METRICS.register_lazy("quality_model", "tastelab.judge.metrics.quality:QualityModel", info=MetricInfo(
    default_model="default",
    family="quality", inputs=("image",), bounds=(1.0, 10.0), normalisation=(1.0, 10.0),
    licence="Apache-2.0 (tastelab's biq2021-mobilenetv2; BIQ2021 labels)",
    description="the shipped technical-quality model's score 1..10"))
METRICS.register_lazy("sharpness", "tastelab.judge.metrics.quality:Sharpness", info=MetricInfo(
    family="quality", inputs=("image",), normalisation=(1.25, 3.35),
    calibration="log10(1 + variance of the Laplacian) of the grey image at 512 px; BIQ2021 photos: 5th..95th "
                "percentile 1.26..3.37, SRCC with MOS +0.54 (bench/judge_quality_measures.py)",
    licence="n/a (model-free)", description="log10(1 + variance of the Laplacian) (higher: sharper)"))
METRICS.register_lazy("exposure_clipping", "tastelab.judge.metrics.quality:Exposure", info=MetricInfo(
    family="quality", inputs=("image",), direction="lower", bounds=(0.0, 1.0), normalisation=(0.0, 0.15),
    calibration="share of clipped pixels at 512 px; BIQ2021 photos: median 0.0004, 95th percentile 0.153",
    licence="n/a (model-free)", description="share of clipped pixels (<= 2 or >= 253 in luminance)"))
METRICS.register_lazy("noise", "tastelab.judge.metrics.quality:Noise", info=MetricInfo(
    # off by default: on real photos the estimate rises with fine detail (SRCC with MOS +0.51 on BIQ2021), so
    # "lower is better" would penalise good images; docs/judge.md says when to turn it on
    enabled=False,
    family="quality", inputs=("image",), direction="lower", normalisation=(0.3, 4.4),
    calibration="Immerkaer's noise sigma in 8-bit levels at 512 px; BIQ2021 photos: 5th..95th percentile "
                "0.28..4.35 (it also counts fine detail: SRCC with MOS +0.51)", licence="n/a (model-free)",
    description="estimated noise standard deviation (Immerkaer 1996)"))
METRICS.register_lazy("musiq", "tastelab.judge.metrics.quality:Musiq", info=MetricInfo(
    enabled=False,
    family="quality", inputs=("image",), bounds=(0.0, 100.0), normalisation=(20.0, 80.0),
    licence="non-commercial (pyiqa)", extra="pyiqa", description="MUSIQ through pyiqa (optional, non-commercial)"))

# --------------------------------------------------------------------------------------------- diversity
METRICS.register_lazy("lpips_diversity", "tastelab.judge.metrics.diversity:LpipsDiversity", info=MetricInfo(
    default_model="stlpips-alex",
    family="diversity", inputs=("set",), per="set", bounds=(0.0, 1.0), normalisation=(0.0, 0.7),
    calibration="mean pairwise shift-tolerant LPIPS (AlexNet) across seeds of one prompt",
    licence="BSD-2 (LPIPS) / stlpips-pytorch", extra="judge",
    description="mean pairwise LPIPS between the seeds of one prompt at one checkpoint"))
METRICS.register_lazy("vendi", "tastelab.judge.metrics.diversity:VendiDiversity", info=MetricInfo(
    default_model=_DINO_S16,
    family="diversity", inputs=("set",), per="set", normalisation=(1.0, 4.0),
    calibration="Vendi score of the seeds' embeddings; 1 = all alike, n = all different",
    licence="that of the embedding encoder", description="Vendi score (exp entropy of K/n's eigenvalues)"))

# ----------------------------------------------------------------------------------------------- copying
METRICS.register_lazy("copy_similarity", "tastelab.judge.metrics.copying:CopySimilarity", info=MetricInfo(
    default_model=_DINO_S16,
    family="copying", inputs=("image", "references", "train_images"), bounds=(-1.0, 1.0),
    normalisation=(0.0, 1.0), calibration="nearest-neighbour cosine; copy threshold calibrated on DreamBooth",
    licence="that of the embedding encoder",
    description="highest cosine similarity to any reference or training image (flags copies)"))

# ------------------------------------------------------------------ alignment: preference scorers (optional)
METRICS.register_lazy("pickscore", "tastelab.judge.metrics.preference:PickScore", info=MetricInfo(
    default_model="yuvalkirstain/PickScore_v1", enabled=False,
    default_options={"processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"},
    family="alignment", inputs=("image", "prompt"), normalisation=(18.0, 23.0),
    calibration="exp(logit_scale) (~100) x CLIP-H/14 cosine; recent Stable Diffusion models average about "
                "20-23 on Pick-a-Pic prompts (approximate, from published comparisons; not measured here)",
    licence="not stated (no licence in the PickScore repository or its README; ask the authors before commercial use)",
    description="PickScore v1: human-preference score of a prompt-image pair (CLIP-H/14 fine-tune)"))
METRICS.register_lazy("hpsv2", "tastelab.judge.metrics.preference:HPSv2", info=MetricInfo(
    enabled=False, default_options={"checkpoint": None},
    family="alignment", inputs=("image", "prompt"), bounds=(-1.0, 1.0), normalisation=(0.22, 0.30),
    calibration="HPS v2 benchmark (tgxs002/HPSv2 README): model averages from 0.2355 (GLIDE) to ~0.28 (best "
                "SD-family models); the range is widened a little for single images",
    licence="Apache-2.0 (HPSv2)", extra="open_clip",
    description="HPS v2 / v2.1: cosine of open_clip ViT-H-14 image and prompt features (fine-tuned on HPD v2)"))
