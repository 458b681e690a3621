"""Fake judge metrics and generated sample trees for the orchestrator, report and CLI tests.

The metrics are real plugins of the registry (``METRICS.register``), computed from the decoded pixels the
orchestrator hands them, and they count their calls so the tests can check what was (re)computed. They
are registered by :func:`registered_fakes` (each test module's ``fake_metrics`` fixture) and removed
afterwards; every built-in metric is disabled in :func:`fake_config`, so the tests do not depend on the
metric modules other helpers are writing.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tastelab.judge.config import builtin_metrics
from tastelab.judge.metrics import METRICS, Metric, MetricInfo, MetricUnavailable

REF_COLOUR = (200, 120, 60)
CALLS: collections.Counter[str] = collections.Counter()  # metric name -> images (or groups) computed


def _small(im: Any) -> np.ndarray:
    return np.asarray(im.rgb().resize((16, 16)), dtype=np.float64)


class FakeEncoder:
    """An image encoder (the :class:`tastelab.judge.encoders.Encoder` surface): 16x16 grey pixels, centred and
    L2-normalised; counts the images it embeds. ``stand_in`` as an offline CNN stand-in would say."""

    can_embed_text = False
    stand_in = True

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.label = f"16x16 grey pixels (test stand-in for {spec})"

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        CALLS[f"embed:{self.spec}"] += len(images)
        rows = []
        for img in images:
            v = np.asarray(img.convert("L").resize((16, 16)), dtype=np.float32).ravel()
            v = v - v.mean()
            rows.append(v / (np.linalg.norm(v) or 1.0))
        return np.stack(rows)


def fake_encoder_loader(spec: str, device: str = "cpu", dtype: str = "auto") -> FakeEncoder:
    return FakeEncoder(spec)


class FakeRefSimilarity(Metric):
    """Consistency: 1 - mean absolute colour difference to the references (0..1); with the ``encoder`` option,
    the mean cosine of that encoder's embeddings to the references' instead (and its own calibrated range)."""

    name = "fake_ref_sim"
    info = MetricInfo(family="consistency", inputs=("image", "references"), bounds=(0.0, 1.0),
                      normalisation=(0.0, 1.0), description="fake")

    def prepare(self, ctx: Any) -> None:
        if not ctx.references:
            raise MetricUnavailable("fake_ref_sim needs --references")
        self._spec = self.options.get("encoder")
        if self._spec:
            self._refs = ctx.image_embeddings(self._spec, ctx.references)
            self._label = ctx.encoder(self._spec).label
        else:
            self._refs = np.stack([_small(r) for r in ctx.references]).mean(axis=0)

    def resolved(self) -> Mapping[str, Any]:
        return {"encoder": self._label} if getattr(self, "_spec", None) else {}

    def normalisation(self) -> tuple[float, float]:
        return (-0.5, 1.0) if self.options.get("encoder") else self.info.normalisation

    def compute_images(self, ctx: Any, images: Sequence[Any]) -> list[float | None]:
        CALLS[self.name] += len(images)
        if self._spec:
            return [float(v) for v in (ctx.image_embeddings(self._spec, images) @ self._refs.T).mean(axis=1)]
        return [float(1.0 - np.abs(_small(im) - self._refs).mean() / 255.0) for im in images]


class FakeBrightness(Metric):
    """Quality: mean brightness 0..255; ``options['scale']`` multiplies it (an option changes the cache key)."""

    name = "fake_bright"
    info = MetricInfo(family="quality", inputs=("image",), bounds=(0.0, 255.0), normalisation=(0.0, 255.0))

    def compute_images(self, ctx: Any, images: Sequence[Any]) -> list[float | None]:
        CALLS[self.name] += len(images)
        scale = float(self.options.get("scale", 1.0))
        return [float(np.asarray(im.rgb()).mean()) * scale for im in images]


class FakeSpread(Metric):
    """Diversity (a set metric): standard deviation of the seeds' mean colours; missing for one seed."""

    name = "fake_spread"
    info = MetricInfo(family="diversity", inputs=("set",), per="set", bounds=None, normalisation=(0.0, 50.0))

    def compute_sets(self, ctx: Any, groups: Mapping[Any, Sequence[Any]]) -> dict[Any, float | None]:
        CALLS[self.name] += len(groups)
        out: dict[Any, float | None] = {}
        for key, members in groups.items():
            means = [np.asarray(im.rgb()).mean() for im in members]
            out[key] = float(np.std(means)) if len(means) > 1 else None
        return out


class FakeCopy(Metric):
    """Copying: highest 1 - mean|a-b|/64 over references and training images at 16x16 (1.0 = same pixels)."""

    name = "fake_copy"
    info = MetricInfo(family="copying", inputs=("image", "references", "train_images"), bounds=(-1.0, 1.0),
                      normalisation=(0.0, 1.0))

    def prepare(self, ctx: Any) -> None:
        self._spec = self.options.get("encoder")
        pool = [*ctx.references, *ctx.train_images]
        self._pool = ctx.image_embeddings(self._spec, pool) if self._spec and pool else [_small(r) for r in pool]

    def compute_images(self, ctx: Any, images: Sequence[Any]) -> list[float | None]:
        CALLS[self.name] += len(images)
        if self._spec:  # the same encoder as fake_ref_sim: the context embeds each image once for both
            return [float(v) for v in (ctx.image_embeddings(self._spec, images) @ self._pool.T).max(axis=1)]
        return [max((1.0 - np.abs(_small(im) - p).mean() / 64.0 for p in self._pool), default=None)
                for im in images]


class FakeUnavailable(Metric):
    """Alignment, never available here (as a hub model offline would be)."""

    name = "fake_vlm"
    info = MetricInfo(family="alignment", inputs=("image", "prompt"), bounds=(0.0, 1.0), normalisation=(0.0, 1.0))

    def prepare(self, ctx: Any) -> None:
        raise MetricUnavailable("fake_vlm: model 'org/fake-vlm' is not cached; run huggingface-cli download "
                                "org/fake-vlm")


class FakeNaN(Metric):
    """A buggy metric: NaN instead of None."""

    name = "fake_nan"
    info = MetricInfo(family="aesthetics", inputs=("image",), bounds=(0.0, 1.0), normalisation=(0.0, 1.0))

    def compute_images(self, ctx: Any, images: Sequence[Any]) -> list[float | None]:
        return [float("nan") for _ in images]


FAKES: tuple[type[Metric], ...] = (FakeRefSimilarity, FakeBrightness, FakeSpread, FakeCopy, FakeUnavailable, FakeNaN)


def registered_fakes() -> Iterator[collections.Counter[str]]:
    """Register the fakes for one test (use from a fixture); yields the call counter."""
    for cls in FAKES:
        METRICS.register(cls.name, info=cls.info)(cls)
    CALLS.clear()
    try:
        yield CALLS
    finally:
        for cls in FAKES:
            METRICS.unregister(cls.name)


def judge_with_fakes(*args: Any, **kwargs: Any) -> Any:
    """:func:`tastelab.judge.judge` with the fakes registered in this process first: the judge of a Ray trial
    runs in a worker process, where no test fixture registered them."""
    from tastelab.judge.run import judge

    if "fake_ref_sim" not in METRICS.names():
        for cls in FAKES:
            METRICS.register(cls.name, info=cls.info)(cls)
    return judge(*args, **kwargs)


def fake_config(*, vlm: bool = False, nan: bool = False, **extra: Any) -> dict[str, Any]:
    """Every built-in metric off, the fakes on (the unavailable and the NaN one only when asked)."""
    metrics: dict[str, Any] = {name: {"enabled": False} for name in builtin_metrics()
                               if not name.startswith("fake_")}
    metrics["fake_vlm"] = {"enabled": vlm}
    metrics["fake_nan"] = {"enabled": nan}
    for name, spec in extra.pop("metrics", {}).items():
        metrics[name] = {**metrics.get(name, {}), **spec}
    return {"metrics": metrics, "copying": {"metric": "fake_copy"}, "bootstrap": {"n_boot": 200}, **extra}


def _picture(colour: tuple[int, int, int], shift: int) -> Image.Image:
    img = Image.new("RGB", (96, 64), colour)
    ImageDraw.Draw(img).ellipse((10 + shift, 10, 50 + shift, 50), fill=(colour[2], colour[0], colour[1]))
    return img


def make_references(root: Path, n: int = 3) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"ref_{i}.png"
        _picture(REF_COLOUR, 4 * i).save(path)
        paths.append(path)
    return paths


def sample_colour(epoch: int, prompt: int, seed: int) -> tuple[int, int, int]:
    """Later epochs are closer to the references' colour (so the last epoch is the best, by construction)."""
    off = 90 // epoch
    return (max(0, REF_COLOUR[0] - off - 3 * seed), min(255, REF_COLOUR[1] + off // 2 + 7 * prompt),
            min(255, REF_COLOUR[2] + off))


def make_subfolders(root: Path, epochs: Sequence[int], prompts: int = 2, seeds: int = 2) -> list[Path]:
    """``root/lora-00000E/p{p}_s{s}.png``: one sub-folder per checkpoint (plain names: no prompt index)."""
    made = []
    for e in epochs:
        folder = root / f"lora-{e:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in range(prompts):
            for s in range(seeds):
                path = folder / f"p{p}_s{s}.png"
                _picture(sample_colour(e, p, s), 6 * s + 3 * p).save(path)
                made.append(path)
    return made


def make_kohya(root: Path, epochs: Sequence[int], prompts: int = 2, seeds: int = 2) -> Path:
    """A kohya-ss training folder: ``root/sample/lora_e{E:06d}_{idx:02d}_{time}_{seed}.png`` plus the
    prompt file it sampled from (returned)."""
    folder = root / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    for e in epochs:
        for p in range(prompts):
            for s in range(seeds):
                _picture(sample_colour(e, p, s), 6 * s + 3 * p).save(
                    folder / f"lora_e{e:06d}_{p:02d}_20260101{e:02d}{p:02d}{s:02d}_{100 + s}.png")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("# sample prompts\n" + "".join(
        f"photo of sks dog, pose {p} <b>bold</b> --n blurry --w 512 --h 512 --d 1\n" for p in range(prompts)),
        encoding="utf-8")
    return prompt_file
