"""Figures, tables and the command line of the analysis stage on synthetic run directories."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest_analysis import write_run

from analysis import collect, figures, stats, tables
from analysis.__main__ import FIGURE_FILES, TABLE_FILES, build_parser

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


def comparisons(tidy: pd.DataFrame, pairs) -> pd.DataFrame:
    return stats.paired_comparisons(tidy, pairs, stats.COMPARISON_METRICS, "test")


DRAWERS = {
    "perplexity": lambda s, p: figures.plot_perplexity(s["tidy"], p),
    "load_balance": lambda s, p: figures.plot_load_balance(s["tidy"], p),
    "load_heatmap": lambda s, p: figures.plot_load_heatmap(s["tidy"], p),
    "load_heatmap_by_index": lambda s, p: figures.plot_load_heatmap(s["tidy"], p, by_rank=False),
    "training_balance": lambda s, p: figures.plot_training_balance(s["router_log"], p),
    "pareto": lambda s, p: figures.plot_pareto(s["tidy"], p),
    "rdesi_internals": lambda s, p: figures.plot_rdesi_internals(s["router_log"], p),
    "ablation_forest": lambda s, p: figures.plot_ablation_forest(
        comparisons(s["tidy"], stats.ablation_pairs(VARIANTS)), p),
    "reference_forest": lambda s, p: figures.plot_reference_forest(
        comparisons(s["tidy"], stats.reference_pairs(VARIANTS, "topk")), p),
}


@pytest.mark.parametrize("name", DRAWERS)
def test_every_figure_writes_a_png(study, tmp_path, name):
    path = DRAWERS[name](study, tmp_path / f"{name}.png")
    assert path == tmp_path / f"{name}.png" and is_png(path)


def test_figures_without_routed_or_rdesi_runs_do_not_crash(study, tmp_path):
    dense_only = study["tidy"][study["tidy"]["variant"] == "dense"]
    no_logs = study["router_log"].iloc[0:0]
    topk_logs = study["router_log"][study["router_log"]["variant"] == "topk"]
    paths = [figures.plot_load_balance(dense_only, tmp_path / "a.png"),
             figures.plot_load_heatmap(dense_only, tmp_path / "b.png"),
             figures.plot_pareto(dense_only, tmp_path / "c.png"),
             figures.plot_training_balance(no_logs, tmp_path / "d.png"),
             figures.plot_rdesi_internals(topk_logs, tmp_path / "e.png"),
             figures.plot_ablation_forest(comparisons(dense_only, []), tmp_path / "f.png")]
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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], ["aggregate"], ["stats"], ["figures"]])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    for option in {"aggregate": ["--run-dirs", "--variants", "--seeds", "--out-table", "--out-status"],
                   "stats": ["--table", "--reference", "--split", "--out-dir"],
                   "figures": ["--table", "--run-dirs", "--out-dir"]}.get(command[0] if command else "", []):
        assert option in text


def test_cli_end_to_end(tmp_path):
    runs = tmp_path / "results" / "runs"
    variants = ["dense", "topk", "rdesi", "rdesi_no_bonus"]
    dirs = [write_run(runs, v, s) for v in variants for s in (0, 1)]
    dirs.append(write_run(runs, "topk", 2, ppl=float("inf")))  # failed
    dirs.append(runs / "rdesi" / "seed2")  # missing
    summary, figures_dir = tmp_path / "results" / "summary", tmp_path / "results" / "figures"
    table = summary / "runs.parquet"

    result = run_cli("aggregate", "--run-dirs", *map(str, dirs), "--variants", *variants,
                     "--seeds", "0", "1", "2", "--out-table", str(table),
                     "--out-status", str(summary / "run_status.csv"))
    assert result.returncode == 0, result.stderr
    status = pd.read_csv(summary / "run_status.csv").set_index(["variant", "seed"])
    assert status.loc[("topk", 2), "status"] == "failed" and status.loc[("rdesi", 2), "status"] == "missing"
    assert status.loc[("dense", 2), "detail"] == "no run directory given"
    assert (summary / "run_status.html").is_file()
    assert "topk/seed2: failed" in result.stderr

    result = run_cli("stats", "--table", str(table), "--reference", "topk", "--split", "test",
                     "--out-dir", str(summary))
    assert result.returncode == 0, result.stderr
    for name in TABLE_FILES:
        assert (summary / f"{name}.csv").is_file() and (summary / f"{name}.html").is_file()
    ablations = pd.read_csv(summary / "ablations.csv")
    assert set(ablations.variant_b) == {"rdesi_no_bonus"} and (ablations.n == 2).all()
    compared = pd.read_csv(summary / "comparisons.csv")
    assert (compared.loc[compared.variant_b == "rdesi", "n"] == 2).all()  # seed 2 failed for topk
    assert compared.p_wilcoxon.isna().all() and (compared.note.fillna("") != "").all()  # n < 5
    assert "n/a" in (summary / "comparisons.html").read_text()

    result = run_cli("figures", "--table", str(table), "--run-dirs", *map(str, dirs),
                     "--out-dir", str(figures_dir))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in figures_dir.iterdir()) == sorted(FIGURE_FILES)
    assert all(is_png(figures_dir / name) for name in FIGURE_FILES)
