"""The Snakemake workflow: lint, DAG shape, parse-time config errors, and the smoke study end to end."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
SMOKE = "workflow/presets/smoke.yaml"
FIGURES = ("perplexity", "pareto", "reference_forest", "load_balance", "load_heatmap", "training_balance",
           "rdesi_internals", "ablation_forest", "flip_rates")
RUN_FILES = ("checkpoint.pt", "config.yaml", "train_log.parquet", "router_log.parquet", "train_summary.json",
             "eval_validation.json", "eval_test.json")
SUMMARY_FILES = ("runs.parquet", "run_status.csv", "run_status.html", "summary.csv", "summary.html",
                 "comparisons.csv", "comparisons.html", "ablations.csv", "ablations.html", "findings.html",
                 "compute.csv", "compute.html")


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count} (without the total)."""
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    counts.pop("total", None)
    return counts


def copy_checkout(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) with the corpus path made absolute."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config["data"]["local_dir"] = str(WIKITEXT)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def write_override(tmp_path: Path, override: dict) -> str:
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return str(path)


def test_lint_is_clean():
    done = snakemake("--lint")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Congratulations, your workflow is in a good condition!" in done.stdout + done.stderr


def test_dry_run_trains_and_evaluates_every_variant_and_seed():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    runs = len(config["variants"]) * len(config["seeds"])
    done = snakemake("--dry-run", "--forceall")
    assert done.returncode == 0, done.stderr
    counts = job_counts(done.stdout)
    assert counts["train"] == runs and "run_config" not in counts  # no job just to write a config
    assert counts["evaluate"] == runs  # one job per run evaluates validation and test
    for shared in ("corpus", "tokenizer", "ngram_baselines", "aggregate", "statistics", "figures", "findings",
                   "compute", "all"):
        assert counts[shared] == 1, shared
    assert counts["shards"] == 3


def test_adding_a_variant_or_a_seed_is_a_config_edit(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    override = {"seeds": [0, 1, 2, 3],
                "variants": config["variants"] + [{"name": "rdesi_strong", "router": "rdesi", "beta": 1.0}]}
    done = snakemake("--dry-run", "--forceall", "--configfile", write_override(tmp_path, override))
    assert done.returncode == 0, done.stderr
    assert job_counts(done.stdout)["train"] == 4 * (len(config["variants"]) + 1)
    assert "rdesi_strong" in snakemake("--list-rules", "--configfile", write_override(tmp_path, override)).stdout


BAD_INPUTS = [
    ({"variants": [{"name": "a", "router": "topq"}]}, "'variants[0].router' = 'topq': unknown router"),
    ({"model": {"top_k": 9}}, "'model.top_k' = 9: must be <= model.n_experts = 8"),
    ({"train": {"lr": 0.0}}, "'train.lr' = 0.0: must be > 0"),
    ({"train": {"lr": -1.0}}, "'train.lr' = -1.0: must be > 0"),
    ({"seeds": []}, "seeds"),
    ({"variants": [{"name": "topk", "router": "topk"}, {"name": "topk", "router": "switch"}]},
     "'variants[1].name' = 'topk': duplicate variant name"),
    ({"train": {"max_stepz": 10}}, "'train.max_stepz' = 10: unknown key"),
    ({"colour": "blue"}, "colour"),
    ({"train": {"max_steps": "many"}}, "'train.max_steps' = 'many': must be of type int"),
    ({"data": {"vocab_size": 100}}, "vocab_size"),
    ({"model": {"vocab_size": 100}}, "'model.vocab_size' = 100: must be >= 258"),
    ({"data": {"seq_len": 128}}, "'data.seq_len' = 128: must be <= model.max_seq_len = 64"),
    ({"reference": "nonexistent"}, "'reference' = 'nonexistent': must be one of the variants"),
    ({"data": {"source": "local", "local_dir": "/nonexistent/wikitext"}}, "'data.local_dir' = '/nonexistent/wikitext'"),
    ({"variants": [{"name": "sw", "router": "switch", "capacity_factor": 0}]},
     "'variants[0].capacity_factor' = 0.0: must be > 0"),
    ({"variants": [{"name": "r", "router": "rdesi", "betta": 1}]}, "'variants[0].betta' = 1: unknown key"),
    ({"statistics": {"primary": ["ppl", "perplexity"]}}, "'statistics.primary' = 'perplexity': unknown metric"),
    ({"statistics": {"alpha": 0.5, "power": 0.4}}, "'statistics.power' = 0.4: must exceed statistics.alpha = 0.5"),
    ({"statistics": {"alpha": 1.5}}, "alpha"),
    ({"findings": {"still_learning_slope": 0}}, "still_learning_slope"),
    ({"findings": {"still_learning_slope": -1.0}}, "'findings.still_learning_slope' = -1.0: must be a number > 0"),
]


def test_statistics_settings_reach_the_analysis_commands(tmp_path):
    override = {"statistics": {"primary": ["ppl", "cv"], "alpha": 0.01, "power": 0.9}}
    done = snakemake("--dry-run", "--forceall", "--printshellcmds", "--configfile", write_override(tmp_path, override))
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if "python -m analysis stats" in line
                or "python -m analysis figures" in line]
    assert len(commands) == 2
    for command in commands:
        assert "--primary ppl cv --alpha 0.01 --power 0.9" in command
        assert "--baselines results/baselines/ngram.json" in command


def merged_config(override: dict) -> dict:
    """config.yaml with `override` merged as Snakemake merges a --configfile (mappings recursively)."""
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(config, override)
    return config


def check_like_the_snakefile(config: dict) -> None:
    """The two checks workflow/rules/common.smk runs at parse time: the JSON schema, then gtmoe.study."""
    from snakemake.utils import validate

    from gtmoe.study import Study, corpus_problem

    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    Study.from_config(config)
    if problem := corpus_problem(config["data"], REPO):
        raise ValueError(problem)


def test_the_default_config_is_valid():
    check_like_the_snakefile(merged_config({}))
    for preset in ("smoke", "gpu"):
        check_like_the_snakefile(merged_config(yaml.safe_load((REPO / f"workflow/presets/{preset}.yaml").read_text())))


@pytest.mark.parametrize("override, message", BAD_INPUTS)
def test_bad_config_is_rejected_naming_the_key(override, message):
    with pytest.raises(Exception) as caught:
        check_like_the_snakefile(merged_config(override))
    assert message in str(caught.value)


@pytest.mark.parametrize("override, message", [BAD_INPUTS[0], BAD_INPUTS[5], BAD_INPUTS[7], BAD_INPUTS[13]])
def test_bad_config_stops_snakemake_before_any_job(tmp_path, override, message):
    done = snakemake("--dry-run", "--configfile", write_override(tmp_path, override))
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "Job stats" not in done.stdout  # nothing was scheduled


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """The smoke preset run once, end to end, in a copy of the checkout."""
    study = copy_checkout(tmp_path_factory.mktemp("smoke") / "study")
    done = snakemake("--cores", "2", "--configfile", SMOKE, cwd=study, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return study


@pytest.mark.integration
def test_smoke_study_writes_every_declared_output(smoke_study):
    smoke = yaml.safe_load((smoke_study / SMOKE).read_text())
    for variant in (v["name"] for v in smoke["variants"]):
        for seed in smoke["seeds"]:
            run = smoke_study / "results" / "runs" / variant / f"seed{seed}"
            for name in RUN_FILES:
                assert (run / name).stat().st_size > 0, run / name
            result = json.loads((run / "eval_test.json").read_text())
            assert (result["variant"], result["seed"], result["split"]) == (variant, seed, "test")
            assert (smoke_study / "results" / "logs" / "train" / variant / f"seed{seed}.log").exists()
            assert (smoke_study / "results" / "benchmarks" / "train" / variant / f"seed{seed}.tsv").exists()
    for name in SUMMARY_FILES:
        assert (smoke_study / "results" / "summary" / name).stat().st_size > 0, name
    status = (smoke_study / "results" / "summary" / "run_status.csv").read_text()
    assert status.count(",ok") == len(smoke["variants"]) * len(smoke["seeds"])


def report_results(html: str) -> dict:
    """The `results` object the Snakemake report app embeds: path -> entry (with a base64 data URI)."""
    start = re.search(r'var results =\s*(?=\{")', html).end()  # not the bundled libraries' `results`
    return json.JSONDecoder().raw_decode(html, start)[0]


@pytest.mark.integration
def test_report_embeds_every_figure(smoke_study):
    results = report_results((smoke_study / "results" / "report.html").read_text())
    for figure in FIGURES:
        path = f"results/figures/{figure}.png"
        assert (smoke_study / path).stat().st_size > 0
        # The report carries each figure's PNG bytes (base64), not a link to the file.
        uri = results[path]["data_uri"]
        assert uri.startswith("data:image/png") and ";base64,iVBORw0KGgo" in uri, figure
    for table in ("summary", "comparisons", "ablations", "run_status"):
        assert f"results/summary/{table}.html" in results, table
    # Every run's evaluation, labelled by variant, seed and split.
    smoke = yaml.safe_load((smoke_study / SMOKE).read_text())
    for variant in (v["name"] for v in smoke["variants"]):
        for seed in smoke["seeds"]:
            entry = results[f"results/runs/{variant}/seed{seed}/eval_test.json"]
            assert entry["labels"] == {"variant": variant, "seed": str(seed), "split": "test"}, entry["labels"]


def report_variable(html: str, name: str):
    """A JSON value the Snakemake report app embeds as ``var name = ...``."""
    start = re.search(rf"var {name} =\s*", html).end()
    return json.JSONDecoder().raw_decode(html, start)[0]


@pytest.mark.integration
def test_findings_come_first_in_the_report(smoke_study):
    html = (smoke_study / "results" / "report.html").read_text()
    entry = report_results(html)["results/summary/findings.html"]
    assert entry["data_uri"].startswith("data:text/html")
    # The app lists categories sorted with JavaScript's localeCompare (menu.js): sort them the same way.
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot sort like the report's JavaScript")
    categories = list(report_variable(html, "categories"))
    script = "console.log(JSON.stringify(JSON.parse(process.argv[1]).sort((a, b) => a.localeCompare(b))))"
    ordered = json.loads(subprocess.run([node, "-e", script, json.dumps(categories)], capture_output=True,
                                        text=True, check=True).stdout)
    assert ordered[0] == "★ Findings", ordered
    # The landing page (workflow description) opens the findings in one click.
    assert "results['results/summary/findings.html'].data_uri" in report_variable(html, "workflow_desc")


@pytest.mark.integration
def test_compute_breakdown_adds_up_the_benchmark_files(smoke_study):
    table = pd.read_csv(smoke_study / "results" / "summary" / "compute.csv")
    benchmarks = smoke_study / "results" / "benchmarks"
    counted = [path for path in benchmarks.rglob("*.tsv") if path.name != "compute.tsv"]
    total = sum(float(pd.read_csv(path, sep="\t")["s"].sum()) for path in counted)
    assert table.iloc[-1]["stage"] == "total" and table.iloc[-1]["jobs"] == len(counted)
    assert table.iloc[-1]["seconds"] == pytest.approx(total)
    stages = set(table.loc[table["part"] == "all", "stage"])
    assert {"data prep", "training", "evaluation", "analysis", "total"} <= stages


@pytest.mark.integration
def test_report_shows_a_figure_in_a_browser(smoke_study, tmp_path):
    from browser import find_chromium, screenshot
    from PIL import Image

    if find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    # Open the report as a reader would, then navigate its app to the load heatmap.
    html = (smoke_study / "results" / "report.html").read_text()
    driver = ("<script>window.addEventListener('load', () => setTimeout(() => {"
              "app.showCategory('Load balance'); app.setView({content: 'img', contentPath: "
              "results['results/figures/load_heatmap.png'].data_uri}); }, 300));</script>")
    end = html.rfind("</body>")
    (tmp_path / "report.html").write_text(html[:end] + driver + html[end:])
    shot = screenshot(tmp_path / "report.html", tmp_path / "report.png", width=1400, height=1000, wait_ms=8000)
    image = Image.open(shot).convert("HSV")
    pane = image.crop((300, 100, 1400, 900))  # right of the navigation bar
    saturated = sum(1 for _, saturation, _ in pane.getdata() if saturation > 80)
    # An empty content pane has no saturated pixels at all; the heatmap colours several percent.
    assert saturated > 0.02 * pane.width * pane.height, "no coloured heatmap visible in the report"


@pytest.mark.integration
def test_second_run_has_nothing_to_do(smoke_study):
    again = snakemake("--cores", "2", "--configfile", SMOKE, cwd=smoke_study)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.integration
def test_rerunning_one_target_runs_nothing_else(smoke_study):
    smoke = yaml.safe_load((smoke_study / SMOKE).read_text())
    first, second = (v["name"] for v in smoke["variants"])
    aggregates = {"aggregate": 1, "statistics": 1, "figures": 1, "findings": 1, "compute": 1}
    # The file-target form: force one run's training; its evaluations and the aggregates follow.
    forced = snakemake("--dry-run", "--forcerun", f"results/runs/{second}/seed0/checkpoint.pt",
                       "--configfile", SMOKE, cwd=smoke_study)
    assert job_counts(forced.stdout) == {"train": 1, "evaluate": 1, **aggregates, "all": 1}
    # A variant target after its runs were removed: those runs, the aggregates, nothing else.
    for seed in smoke["seeds"]:
        shutil.rmtree(smoke_study / "results" / "runs" / first / f"seed{seed}")
    plan = snakemake("--dry-run", first, "--configfile", SMOKE, cwd=smoke_study)
    runs = len(smoke["seeds"])
    assert job_counts(plan.stdout) == {"train": runs, "evaluate": runs, **aggregates, first: 1}
