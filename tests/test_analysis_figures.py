"""Figures, tables and the command line of the analysis stage on synthetic run directories."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from analysis import collect, figures, outputs, stats, tables
from analysis.__main__ import VERBS, build_parser, main

from helpers import run_module, write_baselines, write_run, write_study_record

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


@pytest.fixture(scope="module")
def ngram_json(tmp_path_factory) -> Path:
    """An n-gram baseline file: the bigram within the synthetic PPL range (100-110), the unigram far above."""
    return write_baselines(tmp_path_factory.mktemp("baselines") / "ngram.json")


def comparisons(tidy: pd.DataFrame, pairs) -> pd.DataFrame:
    return stats.paired_comparisons(
        tidy, pairs, stats.COMPARISON_METRICS, "test", primary=["ppl", "gini"], alpha=0.05, power=0.8
    )


DRAWERS = {
    "perplexity": lambda s, p: figures.plot_perplexity(s["tidy"], p),
    "load_balance": lambda s, p: figures.plot_load_balance(s["tidy"], p),
    "load_heatmap": lambda s, p: figures.plot_load_heatmap(s["tidy"], p),
    "load_heatmap_by_index": lambda s, p: figures.plot_load_heatmap(s["tidy"], p, by_rank=False),
    "training_balance": lambda s, p: figures.plot_training_balance(s["router_log"], p),
    "pareto": lambda s, p: figures.plot_pareto(s["tidy"], p),
    "router_state": lambda s, p: figures.plot_router_state(s["router_log"], p),
    "ablation_forest": lambda s, p: figures.plot_ablation_forest(
        comparisons(s["tidy"], stats.ablation_pairs(VARIANTS, "rdesi", ["rdesi_no_load", "rdesi_no_bonus"])), p
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


def test_each_unrouted_variant_has_a_line_of_its_own_dash_pattern(study, tmp_path, monkeypatch):
    """dense and dense_total get neighbouring hues in the routers preset: their lines must differ by dash too."""
    from matplotlib.axes import Axes

    tidy = study["tidy"]
    dense = tidy[tidy["variant"] == "dense"]
    twin = dense.assign(variant="dense_total", value=dense["value"].where(dense["metric"] != "ppl", dense["value"] - 5))
    styles = {}
    axhline = Axes.axhline

    def spy(self, *args, **kwargs):
        if "no router" in kwargs.get("label", ""):
            styles[kwargs["label"].split()[0]] = kwargs["ls"]
        return axhline(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "axhline", spy)
    assert is_png(figures.plot_pareto(pd.concat([tidy, twin], ignore_index=True), tmp_path / "pareto.png"))
    assert sorted(styles) == ["dense", "dense_total"] and styles["dense"] != styles["dense_total"], styles


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
    written = tables.write_summary(summary, tmp_path / "s")
    assert [path.name for path in written] == ["s.parquet", "s.csv", "s.html"]
    html = written[-1].read_text()
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


@pytest.mark.parametrize(
    "command", [[], *([verb] for verb in ("aggregate", "stats", "figures", "findings", "compute"))]
)
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and ("--study" in text if command else "sensitivity" in text)


FIGURE_FILES = [f"{name}.png" for name in outputs.FIGURES]


@pytest.fixture()
def recorded_study(tmp_path, ngram_json) -> dict:
    """A study record under tmp_path/results/test with its runs: one failed and one missing run."""
    root = tmp_path / "results" / "test"
    variants = ["dense", "topk", "rdesi", "rdesi_no_bonus"]
    for v in variants:
        for s in (0, 1):
            write_run(root / "runs", v, s)
    write_run(root / "runs", "topk", 2, ppl=float("inf"))  # failed; rdesi seed 2 is missing
    for v in ("dense", "rdesi_no_bonus"):
        write_run(root / "runs", v, 2)
    statistics = {"primary": ["ppl", "cv"], "alpha": 0.05, "power": 0.9, "split": "test"}
    record = write_study_record(root, variants, (0, 1, 2), statistics=statistics)
    (root / "baselines").mkdir()
    (root / "baselines" / "ngram.json").write_text(ngram_json.read_text())
    return dict(root=root, record=record, summary=root / "summary", figures=root / "figures")


def test_cli_end_to_end(recorded_study):
    summary, study = recorded_study["summary"], str(recorded_study["record"])
    result = run_cli("aggregate", "--study", study)
    assert result.returncode == 0, result.stderr
    status = pd.read_csv(summary / "run_status.csv").set_index(["variant", "seed"])
    assert status.loc[("topk", 2), "status"] == "failed" and status.loc[("rdesi", 2), "status"] == "missing"
    assert status.loc[("rdesi", 2), "detail"] == "missing run directory"
    assert (summary / "run_status.html").is_file() and (summary / "run_status.parquet").is_file()
    assert "topk/seed2: failed" in result.stderr

    result = run_cli("stats", "--study", study)
    assert result.returncode == 0, result.stderr
    for name in outputs.STATISTICS:
        for suffix in ("parquet", "csv", "html"):
            assert (summary / f"{name}.{suffix}").is_file()
    ablations = pd.read_parquet(summary / "ablations.parquet")
    assert set(ablations.variant_b) == {"rdesi_no_bonus"} and (ablations.n == 2).all()  # rdesi seed 2 missing
    compared = pd.read_parquet(summary / "comparisons.parquet")
    assert list(compared.columns) == stats.COMPARISON_COLUMNS
    assert compared["seeds"].map(lambda seeds: isinstance(seeds, str)).all()  # "" stays "" (CSV: NaN)
    assert len(pd.read_csv(summary / "comparisons.csv")) == len(compared)
    assert (compared.loc[compared.variant_b == "rdesi", "n"] == 2).all()  # seed 2 failed for topk
    assert compared.p_wilcoxon.isna().all() and (compared.note != "").all()  # n < 6
    # The record's primary endpoints: cv is not a comparison metric but is compared too; gini is exploratory.
    endpoints = dict(zip(compared.metric, compared.endpoint))
    assert endpoints["ppl"] == endpoints["cv"] == "primary" and endpoints["gini"] == "exploratory"
    rdesi_ppl = compared[(compared.variant_b == "rdesi") & (compared.metric == "ppl")].iloc[0]
    diffs = (
        pd.read_parquet(summary / outputs.TIDY)
        .query(
            "split == 'test' and metric == 'ppl' and layer == 'all' "
            "and run_status == 'ok' and variant in ['topk', 'rdesi']"
        )
        .pivot(index="seed", columns="variant", values="value")
        .dropna()
    )
    sd = (diffs["rdesi"] - diffs["topk"]).std(ddof=1)
    assert rdesi_ppl.mdd == pytest.approx(stats.minimum_detectable_difference(sd, 2, 0.05, 0.9))  # the record's
    page = (summary / "comparisons.html").read_text()
    assert "n/a" in page and "MDD (90% power)" in page and 'class="exploratory"' in page
    assert "Holm-adjusted within its family" in page
    summary_table = pd.read_parquet(summary / "summary.parquet")
    reference_rows = summary_table[summary_table.kind == "reference baseline"]
    assert set(reference_rows.variant) == {"unigram", "bigram"} and set(reference_rows.metric) == {"ppl", "word_ppl"}
    assert reference_rows.query("variant == 'bigram' and split == 'test' and metric == 'ppl'")["mean"].item() == 104.0
    page = (summary / "summary.html").read_text()
    assert "bigram (reference baseline)" in page and 'class="reference"' in page

    result = run_cli("figures", "--study", study)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in recorded_study["figures"].iterdir()) == sorted(FIGURE_FILES)
    assert all(is_png(recorded_study["figures"] / name) for name in FIGURE_FILES)


def test_every_router_option_is_a_column_of_the_tidy_table_and_the_summary(recorded_study):
    study = str(recorded_study["record"])
    assert main(["aggregate", "--study", study]) == 0 and main(["stats", "--study", study]) == 0
    record = json.loads(recorded_study["record"].read_text())
    tidy = pd.read_parquet(recorded_study["summary"] / outputs.TIDY)
    summary = pd.read_parquet(recorded_study["summary"] / "summary.parquet")
    summary_csv = pd.read_csv(recorded_study["summary"] / "summary.csv")
    for table in (tidy, summary, summary_csv):
        variants = table[table["variant"].astype(str).isin(record["variants"])]
        for variant, entry in record["variants"].items():
            rows = variants[variants["variant"].astype(str) == variant]
            assert len(rows) and (rows["router"] == entry["router"]).all()
            for option, value in entry["options"].items():  # e.g. gamma: rdesi's 1.0, rdesi_no_bonus's too
                # an unset option (topk's capacity_factor: dropless) is an empty cell
                assert (rows[option].isna() if value is None else rows[option] == value).all(), (variant, option)
        assert variants.loc[variants["variant"].astype(str) == "topk", "gamma"].isna().all()  # topk has no gamma
    assert tidy["gamma"].dtype == "float64" and summary["gamma"].dtype == "float64"
    assert list(tidy.columns[: len(collect.TIDY_COLUMNS)]) == collect.TIDY_COLUMNS
    baselines = summary[summary["kind"] == "reference baseline"]
    assert baselines["router"].isna().all() and baselines["gamma"].isna().all()


def test_figures_and_findings_read_the_statistics_and_never_recompute_them(recorded_study, monkeypatch):
    study = str(recorded_study["record"])
    assert main(["aggregate", "--study", study]) == 0 and main(["stats", "--study", study]) == 0

    def recomputed(*args, **kwargs):
        raise AssertionError("paired statistics recomputed")

    monkeypatch.setattr(stats, "paired_comparisons", recomputed)
    monkeypatch.setattr(stats, "paired_test", recomputed)
    monkeypatch.setattr(stats, "summarize", recomputed)
    monkeypatch.setattr(figures, "summarize", recomputed)  # the figures' means and CIs: the summary's
    drawn, draw = [], figures.plot_reference_forest
    monkeypatch.setattr(figures, "plot_reference_forest", lambda table, path: drawn.append(table) or draw(table, path))
    assert main(["figures", "--study", study]) == 0
    assert main(["specialisation", "--study", study]) == 0  # the findings read its agreement table
    assert main(["findings", "--study", study]) == 0
    assert (recorded_study["summary"] / outputs.FINDINGS).is_file()
    # The forest plots show the stats step's numbers: its table, not a new one.
    pd.testing.assert_frame_equal(drawn[0], pd.read_parquet(recorded_study["summary"] / "comparisons.parquet"))


def _edit_record(**changes):
    def edit(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


BAD_RECORDS = [  # (damage, the error line's message)
    (lambda path: path.unlink(), "does not exist; run snakemake (a dry run is enough) to write it again"),
    (lambda path: path.write_text("{not json"), "is not valid JSON"),
    (_edit_record(format=99), "'format' = 99: this analysis reads format 1"),
    (_edit_record(reference="nope"), "'reference' = 'nope': must be one of the variants"),
    (_edit_record(statistics={"primary": ["ppl"], "alpha": 0.5, "power": 0.4, "split": "test"}), "'statistics.power'"),
]


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("damage, message", BAD_RECORDS, ids=range(len(BAD_RECORDS)))
def test_a_bad_study_record_is_one_error_line_and_exit_2(recorded_study, capsys, verb, damage, message):
    damage(recorded_study["record"])
    inputs = ["--benchmarks", "unused.tsv"] if verb == "compute" else []  # read after the record
    assert main([verb, "--study", str(recorded_study["record"]), *inputs]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: python -m analysis {verb}: ") and message in lines[0]
    assert str(recorded_study["record"]) in lines[0]  # names the file


def test_the_command_line_reports_a_bad_record_and_a_missing_input_in_one_line(recorded_study):
    _edit_record(reference="nope")(recorded_study["record"])
    result = run_cli("stats", "--study", str(recorded_study["record"]))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "'reference' = 'nope'" in result.stderr
    _edit_record(reference="topk")(recorded_study["record"])
    result = run_cli("figures", "--study", str(recorded_study["record"]))  # before aggregate: no tidy table
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "runs.parquet does not exist; write it with `python -m analysis aggregate" in result.stderr


def test_sensitivity_of_a_study_without_sweeps_is_a_configuration_error(recorded_study, capsys):
    assert main(["sensitivity", "--study", str(recorded_study["record"])]) == 2
    assert "has no sweeps" in capsys.readouterr().err


def test_a_bug_is_not_reported_as_a_configuration_error(recorded_study, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(collect, "collect_runs", bug)
    with pytest.raises(ValueError, match="an internal bug"):  # its traceback reaches the user
        main(["aggregate", "--study", str(recorded_study["record"])])
