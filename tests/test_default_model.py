"""The shipped default model: loads offline, scores the bundled samples sensibly, and (slow) reproduces
its held-out accuracy on the real BIQ2021 photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import pearsonr, spearmanr

from conftest import shared_path
from tastelab import Scorer, load_model
from tastelab.models.presets import preset_folder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer("default", workers=0, batch_size=4)


def test_default_preset_is_a_complete_offline_model_folder() -> None:
    folder = preset_folder("default")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model = load_model("default")
    assert model.config.backbone.name == "mobilenet_v2" and model.config.score_range == (0.0, 1.0)
    assert model.config.metrics, "the shipped model records its validation metrics"


def test_degraded_copies_score_lower_than_the_originals(scorer: Scorer) -> None:
    """A technical-quality model must rank blur, noise and heavy JPEG below the clean photo."""
    for name in ("coffee", "chelsea"):
        clean = scorer.predict(EXAMPLES / f"{name}.jpg").score
        for damage in ("blurred", "noisy", "jpeg q5"):
            worse = scorer.predict(EXAMPLES / f"{name} ({damage}).jpg").score
            assert worse < clean, (name, damage, worse, clean)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 500 photos at 512 px on the CPU: 14 min on two busy cores
def test_held_out_accuracy_on_real_photos(scorer: Scorer) -> None:
    """Re-score the default model's own held-out test photos (never used for training or selection)."""
    images = shared_path("data", "biq2021", "images")
    split = json.loads((preset_folder("default") / "split.json").read_text())
    labels = dict(line.rsplit(",", 1) for line in
                  (images.parent / "labels.csv").read_text().splitlines()[1:])
    test = split["splits"]["test"]
    results = list(Scorer("default", batch_size=16).score_files([str(images / name) for name in test]))
    assert not [r for r in results if r.error]
    pred = {Path(r.path).name: r.raw_score for r in results}
    ours, truth = [pred[n] for n in test], [float(labels[n]) for n in test]
    srcc, plcc = spearmanr(ours, truth)[0], pearsonr(ours, truth)[0]
    print(f"default model on its {len(test)} held-out photos: SRCC {srcc:.4f}, PLCC {plcc:.4f}")
    assert srcc > 0.75, srcc
    # What training measured and wrote into the folder must be what the shipped folder does today.
    training = load_model("default").config.training
    assert training["split"]["sizes"]["test"] == len(test)
    recorded = training["test_metrics"]
    assert srcc == pytest.approx(recorded["srcc"], abs=0.01), (srcc, recorded["srcc"])
    assert plcc == pytest.approx(recorded["plcc"], abs=0.01), (plcc, recorded["plcc"])
