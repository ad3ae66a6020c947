"""Figures, tables and the command line of the analysis stage on synthetic run directories."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from analysis import collect, figures, stats, tables
from analysis.__main__ import FIGURE_FILES, TABLE_FILES, build_parser

from helpers import run_module, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["dense", "topk", "lossfree", "rdesi", "rdesi_no_load", "rdesi_no_bonus"]


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 2_000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """Three seeds per variant, except lossfree with one seed (no CIs possible)."""
    root = tmp_path_factory.mktemp("study") / "runs"
    dirs = [write_run(root, v, s) for v in VARIANTS for s in ((0,) if v == "lossfree" else (0, 1, 2))]
    tidy, status = collect.collect_runs(dirs, VARIANTS, [0, 1, 2])
    router_log = collect.load_router_logs(dirs, variants=VARIANTS)
    return dict(root=root, dirs=dirs, tidy=collect.usable(tidy), status=status, router_log=router_log)


NGRAM = {
    "unigram": {
        "params": {"k": 1.0},
        "validation": {"ppl": 739.0, "word_ppl": 10_866.0, "nll": 6.6, "tokens": 100, "words": 70},
        "test": {"ppl": 711.6, "word_ppl": 10_259.0, "nll": 6.57, "tokens": 120, "words": 80},
    },
    "bigram": {
        "params": {"lambda": 0.89, "k": 1.0},
        "validation": {"ppl": 95.1, "word_ppl": 607.5, "nll": 4.56, "tokens": 100, "words": 70},
        "test": {"ppl": 104.0, "word_ppl": 554.1, "nll": 4.49, "tokens": 120, "words": 80},
    },
}


@pytest.fixture(scope="module")
def ngram_json(tmp_path_factory) -> Path:
    """An n-gram baseline file: the bigram within the synthetic PPL range (100-110), the unigram far above."""
    path = tmp_path_factory.mktemp("baselines") / "ngram.json"
    path.write_text(json.dumps({"models": NGRAM, "vocab_size": 4096, "shards": "results/data/shards"}))
    return path


def comparisons(tidy: pd.DataFrame, pairs) -> pd.DataFrame:
    return stats.paired_comparisons(tidy, pairs, stats.COMPARISON_METRICS, "test")


DRAWERS = {
    "perplexity": lambda s, p: figures.plot_perplexity(s["tidy"], p),
    "load_balance": lambda s, p: figures.plot_load_balance(s["tidy"], p),
    "load_heatmap": lambda s, p: figures.plot_load_heatmap(s["tidy"], p),
    "load_heatmap_by_index": lambda s, p: figures.plot_load_heatmap(s["tidy"], p, by_rank=False),
    "training_balance": lambda s, p: figures.plot_training_balance(s["router_log"], p),
    "pareto": lambda s, p: figures.plot_pareto(s["tidy"], p),
    "router_state": lambda s, p: figures.plot_router_state(s["router_log"], p),
    "ablation_forest": lambda s, p: figures.plot_ablation_forest(
        comparisons(s["tidy"], stats.ablation_pairs(VARIANTS)), p
    ),
    "reference_forest": lambda s, p: figures.plot_reference_forest(
        comparisons(s["tidy"], stats.reference_pairs(VARIANTS, "topk")), p
    ),
}


@pytest.mark.parametrize("name", DRAWERS)
def test_every_figure_writes_a_png(study, tmp_path, name):
    path = DRAWERS[name](study, tmp_path / f"{name}.png")
    assert path == tmp_path / f"{name}.png" and is_png(path)


def test_perplexity_and_pareto_draw_the_ngram_baselines(study, ngram_json, tmp_path, monkeypatch):
    baselines = collect.read_baselines(ngram_json)
    drawn = []
    original = figures._baseline_lines

    def spy(ax, frame, metric, split):
        original(ax, frame, metric, split)
        lines = [(line.get_label(), line.get_ydata()[0]) for line in ax.get_lines() if "baseline" in line.get_label()]
        notes = [text.get_text() for text in ax.texts if text.get_text().startswith("off scale")]
        drawn.append((metric, lines, notes))

    monkeypatch.setattr(figures, "_baseline_lines", spy)
    assert is_png(figures.plot_perplexity(study["tidy"], tmp_path / "ppl.png", baselines=baselines))
    assert is_png(figures.plot_pareto(study["tidy"], tmp_path / "pareto.png", baselines=baselines))
    token_ppl, word_ppl, pareto = drawn
    # The bigram (test PPL 104) lies among the variants (100-110): a labelled horizontal line. The
    # unigram (712) would squash them into a strip: named as off scale instead.
    for metric, lines, notes in (token_ppl, pareto):
        assert metric == "ppl" and lines == [("bigram baseline (104)", 104.0)]
        assert notes == ["off scale: unigram baseline 711.6 (above)"]
    assert word_ppl[0] == "word_ppl" and {label.split()[0] for label, _ in word_ppl[1]} <= {"unigram", "bigram"}


def test_figures_without_routed_or_rdesi_runs_do_not_crash(study, tmp_path):
    dense_only = study["tidy"][study["tidy"]["variant"] == "dense"]
    no_logs = study["router_log"].iloc[0:0]
    topk_logs = study["router_log"][study["router_log"]["variant"] == "topk"]
    paths = [
        figures.plot_load_balance(dense_only, tmp_path / "a.png"),
        figures.plot_load_heatmap(dense_only, tmp_path / "b.png"),
        figures.plot_pareto(dense_only, tmp_path / "c.png"),
        figures.plot_training_balance(no_logs, tmp_path / "d.png"),
        figures.plot_router_state(topk_logs, tmp_path / "e.png"),
        figures.plot_ablation_forest(comparisons(dense_only, []), tmp_path / "f.png"),
    ]
    assert all(is_png(p) for p in paths)


def test_relative_load_ranks_experts_and_averages_seeds(study):
    load = figures.relative_expert_load(study["tidy"])
    topk = load[load["variant"] == "topk"]
    assert set(topk["rank"]) == {1, 2, 3, 4} and (topk["n_seeds"] == 3).all()
    # relative loads of one layer sum to E, and rank 1 is the busiest
    assert topk.groupby("layer")["relative_load"].sum().tolist() == pytest.approx([4.0, 4.0])
    first = topk[topk["layer"] == 0].set_index("rank")["relative_load"]
    assert first.is_monotonic_decreasing


def test_html_tables_show_na_not_nan(study, tmp_path):
    summary = stats.summarize(study["tidy"], stats.SUMMARY_METRICS, ["test"])
    _, page = tables.write_summary(summary, tmp_path / "s.csv", tmp_path / "s.html")
    html = page.read_text()
    assert "n/a" in html and "<style>" in html
    assert re.search(r"\b(nan|inf)\b", html, re.IGNORECASE) is None
    csv = pd.read_csv(tmp_path / "s.csv")
    dense_gini = csv[(csv.variant == "dense") & (csv.metric == "gini")].iloc[0]
    assert dense_gini.n == 0 and pd.isna(dense_gini["mean"])


def test_number_formatting():
    assert tables.format_number(float("nan")) == "n/a"
    assert tables.format_number(152.3456) == "152.3"
    assert tables.format_number(0.123456) == "0.1235"
    assert tables.format_number(12345.6) == "12,346"
    assert tables.format_p(0.0004) == "<0.001" and tables.format_p(0.0312) == "0.031"
    assert tables.format_interval(1.0, float("nan")) == "n/a"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("analysis", *args, timeout=120)


@pytest.mark.parametrize("command", [[], ["aggregate"], ["stats"], ["figures"]])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    for option in {
        "aggregate": ["--run-dirs", "--variants", "--seeds", "--out-table", "--out-status"],
        "stats": ["--table", "--reference", "--split", "--out-dir"],
        "figures": ["--table", "--run-dirs", "--out-dir"],
    }.get(command[0] if command else "", []):
        assert option in text


def test_cli_end_to_end(tmp_path, ngram_json):
    runs = tmp_path / "results" / "runs"
    variants = ["dense", "topk", "rdesi", "rdesi_no_bonus"]
    dirs = [write_run(runs, v, s) for v in variants for s in (0, 1)]
    dirs.append(write_run(runs, "topk", 2, ppl=float("inf")))  # failed
    dirs.append(runs / "rdesi" / "seed2")  # missing
    summary, figures_dir = tmp_path / "results" / "summary", tmp_path / "results" / "figures"
    table = summary / "runs.parquet"

    result = run_cli(
        "aggregate",
        "--run-dirs",
        *map(str, dirs),
        "--variants",
        *variants,
        "--seeds",
        "0",
        "1",
        "2",
        "--out-table",
        str(table),
        "--out-status",
        str(summary / "run_status.csv"),
    )
    assert result.returncode == 0, result.stderr
    status = pd.read_csv(summary / "run_status.csv").set_index(["variant", "seed"])
    assert status.loc[("topk", 2), "status"] == "failed" and status.loc[("rdesi", 2), "status"] == "missing"
    assert status.loc[("dense", 2), "detail"] == "no run directory given"
    assert (summary / "run_status.html").is_file()
    assert "topk/seed2: failed" in result.stderr

    result = run_cli(
        "stats",
        "--table",
        str(table),
        "--reference",
        "topk",
        "--split",
        "test",
        "--primary",
        "ppl",
        "cv",
        "--metrics",
        "ppl",
        "gini",
        "--alpha",
        "0.05",
        "--power",
        "0.9",
        "--baselines",
        str(ngram_json),
        "--out-dir",
        str(summary),
    )
    assert result.returncode == 0, result.stderr
    for name in TABLE_FILES:
        assert (summary / f"{name}.csv").is_file() and (summary / f"{name}.html").is_file()
    ablations = pd.read_csv(summary / "ablations.csv")
    assert set(ablations.variant_b) == {"rdesi_no_bonus"} and (ablations.n == 2).all()
    compared = pd.read_csv(summary / "comparisons.csv")
    assert list(compared.columns) == stats.COMPARISON_COLUMNS
    assert (compared.loc[compared.variant_b == "rdesi", "n"] == 2).all()  # seed 2 failed for topk
    assert compared.p_wilcoxon.isna().all() and (compared.note.fillna("") != "").all()  # n < 6
    # cv is a primary endpoint not in --metrics: compared too; gini is exploratory here.
    endpoints = dict(zip(compared.metric, compared.endpoint))
    assert endpoints == {"ppl": "primary", "gini": "exploratory", "cv": "primary"}
    assert set(compared.family) == {"ppl/test", "gini/test", "cv/test"}
    rdesi_ppl = compared[(compared.variant_b == "rdesi") & (compared.metric == "ppl")].iloc[0]
    diffs = (
        pd.read_parquet(table)
        .query(
            "split == 'test' and metric == 'ppl' and layer == 'all' "
            "and run_status == 'ok' and variant in ['topk', 'rdesi']"
        )
        .pivot(index="seed", columns="variant", values="value")
        .dropna()
    )
    sd = (diffs["rdesi"] - diffs["topk"]).std(ddof=1)
    assert rdesi_ppl.mdd == pytest.approx(stats.minimum_detectable_difference(sd, 2, 0.05, 0.9))
    page = (summary / "comparisons.html").read_text()
    assert "n/a" in page and "MDD (90% power)" in page and 'class="exploratory"' in page
    assert "Holm-adjusted within its family" in page
    summary_csv = pd.read_csv(summary / "summary.csv")
    reference_rows = summary_csv[summary_csv.kind == "reference baseline"]
    assert set(reference_rows.variant) == {"unigram", "bigram"} and set(reference_rows.metric) == {"ppl", "word_ppl"}
    assert reference_rows.query("variant == 'bigram' and split == 'test' and metric == 'ppl'")["mean"].item() == 104.0
    page = (summary / "summary.html").read_text()
    assert "bigram (reference baseline)" in page and 'class="reference"' in page

    bad = run_cli("stats", "--table", str(table), "--alpha", "0.5", "--power", "0.4", "--out-dir", str(tmp_path))
    assert bad.returncode == 2 and "--power 0.4 must exceed --alpha 0.5" in bad.stderr

    result = run_cli(
        "figures",
        "--table",
        str(table),
        "--run-dirs",
        *map(str, dirs),
        "--baselines",
        str(ngram_json),
        "--out-dir",
        str(figures_dir),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in figures_dir.iterdir()) == sorted(FIGURE_FILES)
    assert all(is_png(figures_dir / name) for name in FIGURE_FILES)
