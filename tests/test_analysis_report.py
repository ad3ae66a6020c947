"""Report captions (reStructuredText rendered by Snakemake) and the headless browser helper."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jinja2
import matplotlib
import pytest
from docutils.core import publish_parts
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis import outputs  # noqa: E402

from browser import find_chromium, screenshot  # noqa: E402

REPORT = Path(__file__).resolve().parents[1] / "workflow" / "report"
CAPTIONS = [
    "workflow",
    "run_status",
    "findings",
    "compute",
    *outputs.STATISTICS,
    *outputs.FIGURES,
    "sensitivity",
    "sensitivity_table",
    "sensitivity_best",
    *outputs.SPECIALISATION,
    outputs.COACTIVATION_FIGURE,
    outputs.STABILITY_FIGURE,
]


def render(name: str) -> str:
    """Render a caption as Snakemake does: Jinja first, then docutils; fail on any warning."""
    text = (
        jinja2.Environment(undefined=jinja2.StrictUndefined)
        .from_string((REPORT / f"{name}.rst").read_text())
        .render(snakemake=None, categories={}, files={})
    )
    warnings = io.StringIO()
    body = publish_parts(
        text, writer="html", settings_overrides={"warning_stream": warnings, "report_level": 1, "halt_level": 5}
    )["body"]
    assert warnings.getvalue() == "", warnings.getvalue()
    return body


def test_the_per_run_caption_names_its_run():
    from types import SimpleNamespace

    run = SimpleNamespace(wildcards=SimpleNamespace(variant="rdesi_no_load", seed="2", split="test"))
    text = (
        jinja2.Environment(undefined=jinja2.StrictUndefined)
        .from_string((REPORT / "run_evaluation.rst").read_text())
        .render(snakemake=run)
    )
    warnings = io.StringIO()
    body = publish_parts(text, writer="html", settings_overrides={"warning_stream": warnings, "report_level": 1})[
        "body"
    ]
    assert warnings.getvalue() == "" and "rdesi_no_load" in body and "seed 2" in body and "test" in body


@pytest.mark.parametrize("name", CAPTIONS)
def test_every_output_has_a_clean_caption(name):
    assert len(render(name)) > 200


def test_captions_define_metrics_statistics_and_caveat():
    text = " ".join((REPORT / f"{name}.rst").read_text() for name in CAPTIONS)
    for definition in [
        "exp(mean token NLL)",
        "exp(total NLL / number of words)",  # PPL, word PPL
        "Σ_i Σ_j |c_i − c_j| / (2 E Σ_i c_i)",
        "−Σ_i f_i ln f_i / ln E",  # Gini, entropy
        "std(c) / mean(c)",
        "max_i c_i / mean(c) − 1",
        "f_i < 0.1 / E",  # CV, MaxVio, dead
        "processed by no expert",
        "I(token id; expert)",
        "|TopK_t ∩ TopK_final| / k",
        "tokens/s",
        "peak memory",
        "t(0.975, n − 1)",
        "ttest_rel",
        "wilcoxon",
        "(m − j + 1)",
        "J = 1 − 3 / (4(n − 1) − 1)",
    ]:
        assert definition in text, definition
    assert text.count("later tokens") >= 3  # expert-choice causality caveat where PPL is shown


def test_the_specialisation_captions_define_every_quantity_and_cite_their_sources():
    names = (*outputs.SPECIALISATION, outputs.COACTIVATION_FIGURE, outputs.STABILITY_FIGURE)
    text = " ".join((REPORT / f"{name}.rst").read_text() for name in names)
    for definition in [
        "OLMoE: Open Mixture-of-Experts Language Models",  # co-activation and vocabulary specialisation
        "share[i, j] = C[i, j] / C[i, i]",
        "max_{i ≠ j} share[i, j]",
        "Σ_x max_i N[x, i] / Σ_x n_x",
        "(score − floor) / (1 − floor)",
        "min(H(expert) − L, H(token))",
        "E · f_{g,i}",
        "NeMo",  # utilisation
        "numpy's linear interpolation",
        "StableMoE: Stable Routing Strategy for Mixture of Experts",  # routing stability over training
        "last fluctuation",
        "20% of training",
        "linear_sum_assignment",  # agreement across seeds
        "2 Σ_i C[i, π(i)] / (Σ_t |S_a(t)| + Σ_t |S_b(t)|)",
        "chance",
        "exploratory",
    ]:
        assert definition in text, definition


def test_the_specialisation_category_holds_its_figure_and_tables():
    """The report's category "Specialisation" (workflow/rules/analysis.smk): the co-activation, routing stability and
    agreement figures and the three tables, each with its caption."""
    rules = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "analysis.smk").read_text()
    rule = rules.split("rule specialisation:", 1)[1].split('analysis_command("specialisation")', 1)[0]
    assert rule.count("captioned(") == rule.count('"Specialisation"') == 6
    captions = ("SUMMARY_TABLE", "VOCABULARY_TABLE", "AGREEMENT_TABLE")
    captions += ("outputs.COACTIVATION_FIGURE", "outputs.STABILITY_FIGURE", "outputs.AGREEMENT_FIGURE")
    for caption in captions:
        assert caption in rule.split("output:", 1)[1], caption
    assert outputs.SPECIALISATION == ("specialisation", "vocabulary", "seed_agreement")
    assert outputs.AGREEMENT_FIGURE == outputs.SPECIALISATION[2]  # the table and the figure share their caption
    names = (*outputs.SPECIALISATION, outputs.COACTIVATION_FIGURE, outputs.STABILITY_FIGURE)
    assert all((REPORT / f"{name}.rst").is_file() for name in names)


@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed")
def test_browser_screenshot_of_page_with_embedded_png(tmp_path):
    image = tmp_path / "red.png"
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, color="red"))
    ax.set_axis_off()
    fig.savefig(image, dpi=100)
    plt.close(fig)
    data = base64.b64encode(image.read_bytes()).decode()
    page = tmp_path / "page.html"
    page.write_text(
        f'<html><body style="margin:0"><img src="data:image/png;base64,{data}" '
        'style="width:400px;height:400px"></body></html>'
    )
    shot = screenshot(page, tmp_path / "shot.png", width=600, height=500, wait_ms=500)
    with Image.open(shot) as captured:
        assert captured.size == (600, 500)
        red, green, blue = captured.convert("RGB").getpixel((200, 200))[:3]
    assert red > 200 and green < 80 and blue < 80  # the embedded image was rendered
