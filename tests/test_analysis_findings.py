"""Findings in words, the flip-rate figure and the compute breakdown, on synthetic inputs."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis import collect, compute, figures, findings, outputs, stats, tables
from analysis.__main__ import main
from analysis.stats import sensitivity
from analysis.tables import format_interval, format_number, format_p
from gtmoe.errors import DataError

from helpers import point, tidy_table, write_run, write_study_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def text_of(page: str) -> str:
    """The visible text of an HTML page, whitespace collapsed."""
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.S)
    page = re.sub(r"</?(b|span)\b[^>]*>", "", page)  # inline markup joins its neighbours
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def write_ngram(path: Path, bigram_test: float = 200.0) -> Path:
    payload = {
        "models": {
            "unigram": {
                "params": {},
                "validation": {"ppl": 900.0, "word_ppl": 5000.0},
                "test": {"ppl": 950.0, "word_ppl": 5200.0},
            },
            "bigram": {
                "params": {"lambda": 0.7},
                "validation": {"ppl": bigram_test * 0.9, "word_ppl": 900.0},
                "test": {"ppl": bigram_test, "word_ppl": 1000.0},
            },
        },
        "vocab_size": 512,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


# --------------------------------------------------------------------------- loss slope


def test_final_loss_slope_fits_the_last_tenth_of_steps_like_linregress():
    steps = np.arange(0, 1001, 10)
    rng = np.random.default_rng(0)
    # Steep early descent, then -0.5 nats per 1000 steps in the last 10%: only that part counts.
    loss = np.where(steps < 900, 8 - steps / 200, 3.5 - 0.0005 * (steps - 900)) + 0.01 * rng.standard_normal(steps.size)
    result = findings.final_loss_slope(pd.DataFrame({"step": steps, "loss": loss}))
    window = steps >= 900
    expected = scipy_stats.linregress(steps[window], loss[window]).slope * 1000
    assert result["slope"] == pytest.approx(expected)
    assert result["slope"] == pytest.approx(np.polyfit(steps[window], loss[window], 1)[0] * 1000)  # brute force
    assert result["slope"] == pytest.approx(-0.5, abs=0.2)
    assert (result["points"], result["first_step"], result["last_step"]) == (11, 900, 1000)


def test_final_loss_slope_widens_a_short_window_and_needs_two_points():
    log = pd.DataFrame({"step": [0, 5, 10, 15, 20], "loss": [5.0, 4.0, 3.5, 3.0, 2.0]})
    result = findings.final_loss_slope(log)  # last 10% of 20 steps holds one point: the last 3 are used
    assert result["points"] == 3 and result["first_step"] == 10
    assert result["slope"] == pytest.approx(scipy_stats.linregress([10, 15, 20], [3.5, 3.0, 2.0]).slope * 1000)
    assert math.isnan(findings.final_loss_slope(log.head(1))["slope"])


# --------------------------------------------------------------------------- fixtures


def comparison_rows(reference: str = "topk") -> pd.DataFrame:
    """A comparisons table in the stats format: two primary families and one exploratory one."""

    def row(variant, metric, diff, low, high, p, p_holm, mdd, endpoint="primary", n=3, note=""):
        return dict(
            variant_a=reference,
            variant_b=variant,
            split="test",
            metric=metric,
            n=n,
            seeds="0,1,2",
            mean_a=100.0,
            mean_b=100.0 + diff,
            mean_diff=diff,
            ci_low=low,
            ci_high=high,
            p_ttest=p,
            p_ttest_holm=p_holm,
            p_wilcoxon=math.nan,
            p_wilcoxon_holm=math.nan,
            hedges_gz=1.0,
            note=note,
            family=f"{metric}/test",
            endpoint=endpoint,
            mdd=mdd,
            label="exploratory",
        )

    return pd.DataFrame(
        [
            row("switch", "ppl", 12.5, 5.0, 20.0, 0.004, 0.012, 9.5),
            row("expert_choice", "ppl", -3.25, -9.0, 2.5, 0.2, 0.4, 14.75),
            row("dense", "ppl", -20.0, -60.0, 20.0, 0.3, 0.4, 51.0),
            row("switch", "gini", -0.1, -0.2, -0.02, 0.01, 0.03, 0.07),
            row(
                "expert_choice",
                "gini",
                -0.15,
                -0.15,
                -0.15,
                math.nan,
                math.nan,
                math.nan,
                note="differences are constant: t-test and effect size undefined",
            ),
            row(
                "dense",
                "gini",
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                math.nan,
                n=0,
                note="no seed with finite values in both variants",
            ),
            row("switch", "load_entropy", 0.2, 0.1, 0.3, 0.001, 0.002, 0.05, endpoint="exploratory"),
        ]
    )


def inputs_for(tmp_path: Path, **overrides) -> findings.FindingsInputs:
    variants = ["topk", "switch", "expert_choice", "dense"]
    status = pd.DataFrame(
        [
            dict(variant=v, seed=s, status="ok", detail="", router=v, run_dir=f"r/{v}/seed{s}")
            for v in variants
            for s in (0, 1, 2)
        ]
    )
    status.loc[(status["variant"] == "switch") & (status["seed"] == 2), ["status", "detail"]] = [
        "failed",
        "eval_test.json: non-finite ppl (None)",
    ]
    ppl = {
        "topk": (150.0, 140.0, 160.0),
        "switch": (162.5, 150.0, 175.0),
        "expert_choice": (146.75, 140.0, 153.5),
        "dense": (210.0, 190.0, 230.0),
    }
    summary = pd.DataFrame(
        [
            dict(variant=v, split="test", metric="ppl", n=3, mean=m, std=1.0, ci_low=lo, ci_high=hi, kind="variant")
            for v, (m, lo, hi) in ppl.items()
        ]
        + [
            dict(
                variant="bigram",
                split="test",
                metric="ppl",
                n=1,
                mean=200.0,
                std=math.nan,
                ci_low=math.nan,
                ci_high=math.nan,
                kind="reference baseline",
            )
        ]
    )
    steps = np.arange(0, 201, 10)
    logs = []
    for v in variants:
        for s in (0, 1, 2):
            slope = -3.0 if v == "expert_choice" else -0.1 * (s + 1)  # per 1000 steps
            logs.append(pd.DataFrame({"variant": v, "seed": s, "step": steps, "loss": 4 + slope * steps / 1000}))
    values = dict(
        comparisons=comparison_rows(),
        ablations=comparison_rows("rdesi").iloc[:2],
        summary=summary,
        status=status,
        train_logs=pd.concat(logs, ignore_index=True),
        baselines=collect.read_baselines(write_ngram(tmp_path / "ngram.json")),
        reference="topk",
        split="test",
        alpha=0.05,
        power=0.8,
        group_routed={"expert_choice": "expert choice"},  # the study record's routers say so
    )
    values.update(overrides)
    return findings.FindingsInputs(**values)


# --------------------------------------------------------------------------- verdicts


def test_adequacy_flags_every_failed_check_and_passes_the_rest(tmp_path):
    verdicts = findings.adequacy(inputs_for(tmp_path)).set_index("variant")
    assert verdicts.loc["topk", "problems"] == []
    assert verdicts.loc["topk", "beats_bigram"] == True  # noqa: E712 (numpy bool)
    # mean slope over seeds and its t CI, from the seeds' slopes (-0.1, -0.2, -0.3 per 1000 steps)
    assert verdicts.loc["topk", "slope"] == pytest.approx(-0.2)
    low, high = stats.t_confidence_interval([-0.1, -0.2, -0.3])
    assert (verdicts.loc["topk", "slope_ci_low"], verdicts.loc["topk", "slope_ci_high"]) == pytest.approx((low, high))
    assert verdicts.loc["switch", "runs_ok"] == 2 and "seed 2 failed" in verdicts.loc["switch", "problems"][0]
    assert verdicts.loc["dense", "beats_bigram"] == False  # noqa: E712
    assert "not below the bigram's 200.0" in verdicts.loc["dense", "problems"][0]
    # A steep final slope is reported, never a failed check: under a decaying rate it flattens with the schedule.
    assert (
        verdicts.loc["expert_choice", "slope"] == pytest.approx(-3.0)
        and verdicts.loc["expert_choice", "problems"] == []
    )
    assert "still_learning" not in verdicts.columns


def test_adequacy_without_baseline_or_logs_says_so(tmp_path):
    empty_logs = pd.DataFrame(
        {
            "variant": pd.Series(dtype=str),
            "seed": pd.Series(dtype=int),
            "step": pd.Series(dtype=int),
            "loss": pd.Series(dtype=float),
        }
    )
    verdicts = findings.adequacy(
        inputs_for(tmp_path, baselines=collect.read_baselines(None), train_logs=empty_logs)
    ).set_index("variant")
    assert "no bigram baseline on test to compare with" in verdicts.loc["topk", "problems"]
    assert "no training log" in verdicts.loc["topk", "problems"]


def test_primary_endpoints_split_by_holm_p_and_exploratory_rows_stay_out(tmp_path):
    families = findings.classify(comparison_rows(), alpha=0.05)
    assert list(families) == ["ppl/test", "gini/test"]  # load_entropy is exploratory
    assert list(families["ppl/test"]["significant"]["variant_b"]) == ["switch"]
    assert list(families["ppl/test"]["not_significant"]["variant_b"]) == ["expert_choice", "dense"]
    assert list(families["gini/test"]["untestable"]["variant_b"]) == ["expert_choice", "dense"]
    # A stricter level moves switch's PPL (Holm p 0.012) out of the significant set.
    assert findings.classify(comparison_rows(), alpha=0.01)["ppl/test"]["significant"].empty


# --------------------------------------------------------------------------- the page


def test_page_states_every_number_from_the_tables_and_flags_failures_in_red(tmp_path):
    inputs = inputs_for(tmp_path)
    page = findings.render(inputs)
    text = text_of(page)
    rows = comparison_rows().set_index(["variant_b", "metric"])
    switch = rows.loc[("switch", "ppl")]
    # Δ and MDD also relative to the reference's mean (100): +12.5% and 9.5%.
    assert (
        f"switch: Δ = {format_number(switch.mean_diff)} (+12.5%) (worse), 95% CI "
        f"{format_interval(switch.ci_low, switch.ci_high)}, Holm p = {format_p(switch.p_ttest_holm)}, n = 3, "
        f"MDD = {format_number(switch.mdd)} (9.5%)"
    ) in text
    # Not significant: no direction claimed; the expert-choice PPL carries the caveat's dagger.
    assert f"expert_choice†: Δ = {format_number(-3.25)} (-3.2%), 95% CI" in text
    # MDD range of the PPL family: smallest to largest of its rows.
    assert (
        f"could not detect differences in PPL smaller than the minimum detectable difference (MDD), "
        f"{format_number(9.5)} to {format_number(51.0)}, depending on the comparison"
    ) in text
    assert "differences are constant: t-test and effect size undefined" in text  # untestable, with the reason
    assert "Holm family of 3 comparisons" in text and "Holm family of 1 comparison" in text
    assert "1 of 1 comparisons reach Holm p < 0.05" in text  # the exploratory row, counted
    assert "Ablations: each against rdesi" in text
    assert "routing depends on later tokens" in text  # the expert-choice caveat
    # Failing variants: listed under Checks, in red, and still in the adequacy table.
    red = re.findall(r'<ul style="color:#b3261e[^"]*">(.*?)</ul>', page, flags=re.S)
    assert len(red) == 1
    flagged = text_of(red[0])
    for variant in ("switch", "dense"):
        assert variant in flagged
    assert "topk" not in flagged and "expert_choice" not in flagged  # its steep final slope is no failed check
    assert "2 of 4 variants fail a check" in text
    assert text.count("fails:") == 2 and text.count("adequate") == 2
    assert "No horizon check declared in this study" in text


def test_page_without_failures_or_expert_choice(tmp_path):
    inputs = inputs_for(tmp_path)
    keep = ["topk"]
    page = findings.render(
        findings.FindingsInputs(
            **{
                **inputs.__dict__,
                "status": inputs.status[inputs.status["variant"].isin(keep)],
                "comparisons": inputs.comparisons.iloc[0:0],
                "ablations": inputs.ablations.iloc[0:0],
                "group_routed": {},
            }
        )
    )
    text = text_of(page)
    assert "Every variant passes the checks" in text and "#b3261e" not in page.split("</style>")[1]
    assert "later tokens" not in text and "No comparison" in text


def test_findings_command_on_a_synthetic_study(tmp_path):
    variants = ["topk", "expert_choice", "rdesi", "rdesi_no_load"]
    for v in variants:
        for s in (0, 1, 2):
            write_run(tmp_path / "runs", v, s)
    record = write_study_record(tmp_path, variants)
    write_ngram(tmp_path / "baselines" / "ngram.json", bigram_test=104.0)
    for verb in ("aggregate", "stats", "specialisation", "findings"):
        assert main([verb, "--study", str(record)]) == 0
    summary_dir = tmp_path / "summary"
    text = text_of((summary_dir / outputs.FINDINGS).read_text())
    comparisons = pd.read_parquet(summary_dir / "comparisons.parquet")
    primary = comparisons[comparisons["endpoint"] == "primary"]
    for row in primary[primary["p_ttest"].notna()].itertuples():  # every primary comparison is stated
        assert f"{row.variant_b}" in text and f"Δ = {format_number(row.mean_diff)}" in text
        assert f"MDD = {format_number(row.mdd)}" in text
    # The synthetic PPLs lie in [100, 110]: whoever has a mean at or above the bigram's 104 is flagged.
    means = collect.usable(pd.read_parquet(summary_dir / "runs.parquet"))
    means = (
        means[(means["metric"] == "ppl") & (means["split"] == "test")].groupby("variant", observed=True)["value"].mean()
    )
    for variant, mean in means.items():
        assert (f"{variant}: mean test PPL {format_number(mean)} is not below" in text) == (mean >= 104.0)
    # The record's settings: the ablation (rdesi_no_load against rdesi), the caveat of the router that
    # balances load by construction (its evaluation JSONs do not say how they routed), with its label; no
    # sensitivity section without sweeps.
    assert "Ablations: each against rdesi" in text and "rdesi_no_load" in text
    assert "† expert_choice: its router, expert choice, routed the evaluation non-causally" in text
    assert "Sensitivity" not in text


def test_findings_reads_the_sensitivity_tables_only_when_the_record_has_sweeps(tmp_path):
    variants = ["topk", "rdesi"]
    for v in variants:
        for s in (0, 1):
            write_run(tmp_path / "runs", v, s)
    write_ngram(tmp_path / "baselines" / "ngram.json")
    design = [point("rdesi_c", "c", 3.0, "rdesi", "bonus")]
    record = write_study_record(tmp_path, variants, (0, 1), sweeps=design)
    for verb in ("aggregate", "stats", "specialisation"):
        assert main([verb, "--study", str(record)]) == 0
    # A study with sweeps needs its sensitivity tables: absent, that is an error naming the step.
    assert main(["findings", "--study", str(record)]) == 2
    assert main(["sensitivity", "--study", str(record)]) == 0
    assert (tmp_path / "figures" / outputs.sensitivity_figure("rdesi_c")).is_file()
    assert main(["findings", "--study", str(record)]) == 0
    assert "Sensitivity: dose-response" in text_of((tmp_path / "summary" / outputs.FINDINGS).read_text())
    # The same root without sweeps in its record: a sensitivity table left there is not shown.
    write_study_record(tmp_path, variants, (0, 1))
    assert main(["findings", "--study", str(record)]) == 0
    assert "Sensitivity" not in text_of((tmp_path / "summary" / outputs.FINDINGS).read_text())


def test_the_findings_page_escapes_every_value(tmp_path):
    inputs = inputs_for(tmp_path, reference="<topk>", group_routed={"expert_choice": "<b>choice</b>"})
    page = findings.render(inputs)
    assert "&lt;topk&gt;" in page and "<topk>" not in page and "<b>choice</b>" not in page


# --------------------------------------------------------------------------- flip rates


def test_flip_rate_curves_and_figure(tmp_path):
    logs = []
    for seed in (0, 1, 2):
        steps = np.arange(0, 50, 10)
        logs.append(
            pd.DataFrame(
                {
                    "variant": "rdesi",
                    "seed": seed,
                    "step": steps,
                    "loss": 1.0,
                    "flip_rate_reputation": 0.01 * (seed + 1),
                    "flip_rate_load": 0.2,
                    "flip_rate_bonus": 0.05,
                    "flip_rate_bias": math.nan,
                }
            )
        )
        logs.append(
            pd.DataFrame(
                {"variant": "lossfree", "seed": seed, "step": steps, "loss": 1.0, "flip_rate_bias": 0.1 + 0.01 * seed}
            )
        )
        logs.append(pd.DataFrame({"variant": "topk", "seed": seed, "step": steps, "loss": 1.0}))
    train_log = pd.concat(logs, ignore_index=True)
    train_log["variant"] = pd.Categorical(train_log["variant"], ["topk", "lossfree", "rdesi"], ordered=True)
    curves = figures.flip_rate_curves(train_log)
    assert set(curves["variant"]) == {"rdesi", "lossfree"}  # NaN / absent terms drop out
    assert set(curves.loc[curves["variant"] == "lossfree", "term"]) == {"flip_rate_bias"}
    at_step = curves[(curves["term"] == "flip_rate_reputation") & (curves["step"] == 20)]["flip_rate"]
    assert at_step.mean() == pytest.approx(0.02) and len(at_step) == 3
    path = figures.plot_flip_rates(train_log, tmp_path / "flip_rates.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    # No router with selection terms: a message figure, still a PNG.
    empty = figures.plot_flip_rates(
        train_log[train_log["variant"] == "topk"][["variant", "seed", "step", "loss"]], tmp_path / "empty.png"
    )
    assert empty.read_bytes()[:8] == PNG_MAGIC
    assert figures.flip_rate_curves(None).empty


# --------------------------------------------------------------------------- compute breakdown


def write_benchmark(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        f"{seconds}\t0:00:{int(seconds):02d}\t100\t200\t50\t60\t0\t0\t90\t{seconds}\n"
    )
    return path


@pytest.fixture
def benchmarked_study(tmp_path):
    """Benchmarks of a 2-run study: per-run evaluation for topk, per-split evaluation for rdesi."""
    bench, runs = tmp_path / "benchmarks", tmp_path / "runs"
    files = [
        write_benchmark(bench / "corpus.tsv", 3.0),
        write_benchmark(bench / "tokenizer.tsv", 5.0),
        write_benchmark(bench / "shards" / "train.tsv", 2.0),
        write_benchmark(bench / "ngram_baselines.tsv", 4.0),
        write_benchmark(bench / "run_config" / "topk" / "seed0.tsv", 1.5),
        write_benchmark(bench / "statistics.tsv", 2.5),
    ]
    for variant, train_s, train_wall in (("topk", 100.0, 90.0), ("rdesi", 120.0, 125.0)):  # rdesi: resumed run
        run = runs / variant / "seed0"
        run.mkdir(parents=True)
        (run / "train_summary.json").write_text(json.dumps({"wall_s": train_wall}))
        (run / "eval_validation.json").write_text(json.dumps({"wall_s": 10.0}))
        (run / "eval_test.json").write_text(json.dumps({"wall_s": 12.0}))
        files.append(write_benchmark(bench / "train" / variant / "seed0.tsv", train_s))
    files.append(write_benchmark(bench / "evaluate" / "topk" / "seed0.tsv", 30.0))
    files.append(write_benchmark(bench / "evaluate" / "rdesi" / "seed0_validation.tsv", 15.0))
    files.append(write_benchmark(bench / "evaluate" / "rdesi" / "seed0_test.tsv", 16.0))
    return dict(bench=bench, runs=runs, files=files)


def test_jobs_table_splits_run_jobs_into_in_process_and_overhead(benchmarked_study):
    jobs = compute.jobs_table(benchmarked_study["files"], benchmarked_study["bench"], benchmarked_study["runs"])
    jobs = jobs.set_index("benchmark")
    assert jobs.loc["corpus.tsv", "stage"] == "data prep" and math.isnan(jobs.loc["corpus.tsv", "in_process_s"])
    assert jobs.loc["shards/train.tsv", "stage"] == "data prep"
    assert jobs.loc["train/topk/seed0.tsv", ["in_process_s", "overhead_s"]].tolist() == [90.0, 10.0]
    assert jobs.loc["train/rdesi/seed0.tsv", ["in_process_s", "overhead_s"]].tolist() == [120.0, 0.0]  # floored
    assert jobs.loc["evaluate/topk/seed0.tsv", ["in_process_s", "overhead_s"]].tolist() == [22.0, 8.0]  # both splits
    assert jobs.loc["evaluate/rdesi/seed0_test.tsv", ["in_process_s", "overhead_s"]].tolist() == [12.0, 4.0]


def test_breakdown_adds_up_to_the_benchmark_total(benchmarked_study):
    files = benchmarked_study["files"]
    jobs = compute.jobs_table(files, benchmarked_study["bench"], benchmarked_study["runs"])
    table = compute.breakdown(jobs)
    total = sum(float(pd.read_csv(f, sep="\t")["s"].sum()) for f in files)  # independent sum of every file
    assert table.iloc[-1]["stage"] == "total" and table.iloc[-1]["seconds"] == pytest.approx(total)
    stages = table[(table["part"] == "all") & (table["stage"] != "total")]
    assert list(stages["stage"]) == ["data prep", "baselines", "run configs", "training", "evaluation", "analysis"]
    assert stages["percent"].sum() == pytest.approx(100.0)
    by = table.set_index(["stage", "part"])
    assert by.loc[("training", "all"), "seconds"] == 220.0
    assert by.loc[("training", compute.IN_PROCESS), "seconds"] == 210.0
    assert by.loc[("evaluation", compute.OVERHEAD), "seconds"] == pytest.approx(8.0 + 5.0 + 4.0)
    assert by.loc[("evaluation", "all"), "percent"] == pytest.approx(100 * 61.0 / total)
    # Overhead over all stages: train + evaluate overhead plus the whole run-config job.
    assert by.loc[("all stages", compute.OVERHEAD), "seconds"] == pytest.approx(10.0 + 0.0 + 17.0 + 1.5)


def test_compute_command_writes_csv_and_html(benchmarked_study, tmp_path):
    # The fixture's benchmarks/ and runs/ are a study root's: the record's runs are topk and rdesi, seed 0.
    record = write_study_record(tmp_path, ["topk", "rdesi"], (0,))
    stale = write_benchmark(benchmarked_study["bench"] / "train" / "removed_variant" / "seed0.tsv", 99.0)
    unswept = write_benchmark(benchmarked_study["bench"] / "sensitivity.tsv", 9.0)
    files = [str(path) for path in benchmarked_study["files"]]
    assert main(["compute", "--study", str(record), "--benchmarks", *files]) == 0
    out = tmp_path / "summary" / "compute.csv"
    table = pd.read_csv(out)
    assert list(table.columns) == compute.BREAKDOWN_COLUMNS
    # Exactly the files it is given (the job's inputs), never others lying in the directory.
    expected = compute.breakdown(
        compute.jobs_table(benchmarked_study["files"], benchmarked_study["bench"], benchmarked_study["runs"])
    )
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert stale.is_file() and unswept.is_file()
    text = text_of(out.with_suffix(".html").read_text())
    assert "Compute breakdown" in text and "start-up + per-job overhead" in text and "evaluation" in text


def test_a_file_that_is_not_a_benchmark_is_rejected(tmp_path):
    bad = tmp_path / "b" / "train" / "x" / "seed0.tsv"
    bad.parent.mkdir(parents=True)
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(DataError, match="not a Snakemake benchmark file"):
        compute.jobs_table([bad], tmp_path / "b", tmp_path / "runs")


def test_sensitivity_curves_in_words(tmp_path):
    # beta: Gini falls with the value; PPL is lowest at 0.1. With MaxVio global <= 0.45 (beta 1 and 3 are within):
    # the lower PPL of the two, 1.
    gini = {0: 0.30, 0.1: 0.25, 1: 0.10, 3: 0.05}
    ppl = {0: 99.0, 0.1: 98.0, 1: 99.5, 3: 120.0}
    design = [point("terms", "beta", v, "rdesi" if v == 0.1 else f"rdesi-beta{v:g}") for v in gini]
    values = {
        "topk": {
            "ppl": {s: 100.0 + s for s in (0, 1, 2)},
            "gini": {s: 0.2 for s in (0, 1, 2)},
            "maxvio_global": {s: 0.5 for s in (0, 1, 2)},
        }
    }
    for p in design:
        values[p["variant"]] = {
            "ppl": {s: ppl[p["value"]] + s for s in (0, 1, 2)},
            "gini": {s: gini[p["value"]] + 0.01 * s for s in (0, 1, 2)},
            "maxvio_global": {s: 0.4 if p["value"] >= 1 else 0.6 for s in (0, 1, 2)},
            "flip_rate_reputation": {s: 0.2 * p["value"] for s in (0, 1, 2)},
        }
    dose = sensitivity.dose_response(tidy_table(values), design, "test", "topk")
    best = sensitivity.best_values(dose, "ppl", {"maxvio_global": 0.45})
    tables.write_sensitivity(dose, best, tmp_path)
    page = findings.render(
        inputs_for(
            tmp_path,
            sensitivity=pd.read_parquet(tmp_path / "sensitivity.parquet"),
            sensitivity_best=pd.read_parquet(tmp_path / "sensitivity_best.parquet"),
        )
    )
    text = text_of(page)
    assert "Sensitivity: dose-response of the swept options" in text
    assert "beta, the reputation term: 4 values from 0 to 3." in text
    assert "Gini 0.3100 → 0.06000 (topk: 0.2000). PPL 100.0 → 121.0 (topk: 101.0)." in text  # seed means
    assert (
        "Chosen by the declared rule, lowest mean ppl with mean maxvio_global ≤ 0.45: beta = 1 (PPL 100.5, "
        "MaxVio global 0.4000, Gini 0.1100 [0.08516, 0.1348])" in text
    )
    assert "flips up to 60.0% of top-k sets (at 3)" in text
    # Every seed moves with topk's here, so every paired interval is a point and excludes 0.
    assert "Perplexity differs from topk's beyond the seeds' noise below it at 0, 0.1, 1 and above it at 3." in text

    # Seeds that disagree: beta 0.1 and 1 now straddle topk's perplexity (their intervals contain 0).
    for variant, shifts in (("rdesi", (-3.0, 2.0, 1.0)), ("rdesi-beta1", (2.0, -2.5, 0.0))):
        values[variant]["ppl"] = {s: 101.0 + s + shifts[s] for s in (0, 1, 2)}
    dose = sensitivity.dose_response(tidy_table(values), design, "test", "topk")
    text = " ".join(map(findings.plain, findings.sensitivity_items(dose, sensitivity.best_values(dose))))
    assert (
        "beyond the seeds' noise below it at 0 and above it at 3; at the other 2 the Δ PPL interval contains 0, "
        "so whether they are no worse is within noise." in text
    )
    for variant in ("rdesi", "rdesi-beta1", "rdesi-beta0"):  # nothing separated: the sentence says so
        values[variant]["ppl"] = {s: 101.0 + s + (-1.0, 1.0, 0.5)[s] for s in (0, 1, 2)}
    dose = sensitivity.dose_response(tidy_table(values), design, "test", "topk")
    text = " ".join(map(findings.plain, findings.sensitivity_items(dose, sensitivity.best_values(dose))))
    assert "No value's Δ PPL interval excludes 0" not in text  # beta 3 is still far above
    values["rdesi-beta3"]["ppl"] = {s: 101.0 + s + (1.0, -1.0, 0.5)[s] for s in (0, 1, 2)}
    dose = sensitivity.dose_response(tidy_table(values), design, "test", "topk")
    text = " ".join(map(findings.plain, findings.sensitivity_items(dose, sensitivity.best_values(dose))))
    assert "No value's Δ PPL interval excludes 0: these seeds do not separate any value's perplexity" in text
    # Without sweeps there is no such section.
    assert "Sensitivity" not in text_of(findings.render(inputs_for(tmp_path)))


def test_the_busiest_experts_load_over_training_against_a_loop():
    """E · max f per logged batch, averaged over the first and last tenth of each run's steps, then layers, then
    seeds, computed here by plain loops over helpers.make_router_log's rows (steps 0 … 200: 0 and 200 qualify)."""
    from helpers import make_router_log

    logs = pd.concat(
        [make_router_log(v, s).assign(variant=v, seed=s) for v in ("topk", "rdesi") for s in (0, 1, 2)],
        ignore_index=True,
    )
    logs.loc[(logs["variant"] == "topk") & (logs["step"] == 100), "load"] = np.nan  # an unlogged row is skipped
    table = findings.busiest_load_over_training(logs).set_index("variant")
    assert list(table.index) == ["topk", "rdesi"]
    for variant in ("topk", "rdesi"):
        early, late = [], []
        for seed in (0, 1, 2):
            rows = logs[(logs["variant"] == variant) & (logs["seed"] == seed)]
            by_layer = {"early": [], "late": []}
            for phase, step in (("early", 0), ("late", 200)):
                for layer in sorted(set(rows["layer"])):
                    f = rows[(rows["layer"] == layer) & (rows["step"] == step)]["load"].to_numpy()
                    by_layer[phase].append(len(f) * f.max() / f.sum())
            early.append(np.mean(by_layer["early"]))
            late.append(np.mean(by_layer["late"]))
        assert table.loc[variant, "early"] == pytest.approx(np.mean(early))
        assert table.loc[variant, "late"] == pytest.approx(np.mean(late))
        assert table.loc[variant, "n_seeds"] == 3
    item = findings.load_over_training_item(logs)
    text = "".join(part for part, _ in item[0])
    assert text.startswith("Load over training: ") and "topk" in text and "rdesi" in text
    assert findings.load_over_training_item(logs.iloc[:0]) == []
