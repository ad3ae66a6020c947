"""The Snakemake workflow: lint, DAG shape, parse-time config errors, and the smoke study end to end."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess

import pandas as pd
import pytest
import yaml

from analysis.outputs import FIGURES  # every report figure of the analysis (its one list of names)

from helpers import (
    ALIAS_BOMB,
    DECOYS,
    REPO,
    RUN_FILES,
    SMOKE,
    SUMMARY_FILES,
    WIKITEXT,
    check_like_the_snakefile,
    copy_checkout,
    copy_study,
    merged_config,
    snakemake,
    write_override,
    write_run_configs,
)

SMOKE_SWEEP = "rdesi_bonus"  # the smoke preset's sweep: rdesi's c at 0 and 30 beside its own value
SMOKE_SWEEP_POINTS = ("rdesi-c0", "rdesi-c30")


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count} (without the total)."""
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^([\w.-]+)\s+(\d+)$", line.strip())  # sweep points' names hold '.' and '-'

        if not match:
            break
        counts[match[1]] = int(match[2])
    counts.pop("total", None)
    return counts


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
    for shared in (
        "corpus",
        "tokenizer",
        "ngram_baselines",
        "aggregate",
        "statistics",
        "figures",
        "findings",
        "compute",
        "all",
    ):
        assert counts[shared] == 1, shared
    assert counts["shards"] == 3


def test_adding_a_variant_or_a_seed_is_a_config_edit(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    override = {
        "seeds": [0, 1, 2, 3],
        "variants": config["variants"] + [{"name": "rdesi_strong", "router": "rdesi", "beta": 1.0}],
    }
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
    (
        {"variants": [{"name": "topk", "router": "topk"}, {"name": "topk", "router": "switch"}]},
        "'variants[1].name' = 'topk': duplicate variant name",
    ),
    ({"train": {"max_stepz": 10}}, "'train.max_stepz' = 10: unknown key"),
    ({"colour": "blue"}, "colour"),
    ({"train": {"max_steps": "many"}}, "'train.max_steps' = 'many': must be of type int"),
    ({"data": {"vocab_size": 100}}, "vocab_size"),
    ({"model": {"vocab_size": 100}}, "'model.vocab_size' = 100: must be >= 258"),
    ({"data": {"seq_len": 128}}, "'data.seq_len' = 128: must be <= model.max_seq_len = 64"),
    ({"reference": "nonexistent"}, "'reference' = 'nonexistent': must be one of the variants"),
    ({"data": {"source": "local", "local_dir": "/nonexistent/wikitext"}}, "'data.local_dir' = '/nonexistent/wikitext'"),
    (
        {"variants": [{"name": "sw", "router": "switch", "capacity_factor": 0}]},
        "'variants[0].capacity_factor' = 0.0: must be > 0",
    ),
    ({"variants": [{"name": "r", "router": "rdesi", "betta": 1}]}, "'variants[0].betta' = 1: unknown key"),
    ({"statistics": {"primary": ["ppl", "perplexity"]}}, "'statistics.primary' = 'perplexity': unknown metric"),
    ({"statistics": {"alpha": 0.5, "power": 0.4}}, "'statistics.power' = 0.4: must exceed statistics.alpha = 0.5"),
    ({"statistics": {"alpha": 1.5}}, "alpha"),
    ({"findings": {"horizon": {"variant": "topk", "longer": "topk", "max_gain": 0.05}}}, "findings.horizon.longer"),
    (
        {"findings": {"horizon": {"variant": "topk", "longer": "switch", "max_gain": 0.05}}},
        "'findings.horizon.longer' = 'switch': must be 'topk' trained longer",
    ),
    # Issue 13: every input bounded at parse time. A str is the --configfile's YAML text, read as common.smk does.
    ("train:\n  lr: 0.001\n  lr: 0.002\n", "override.yaml line 3: invalid YAML: duplicate key 'lr' (first on line 2)"),
    (ALIAS_BOMB, "override.yaml line 2: invalid YAML: YAML anchor &a is not accepted"),
    ("model: {d_model: 64}\ntrain: *x\n", "invalid YAML: YAML alias *x is not accepted"),
    ({"train": {"junk": "x" * 100_000}}, "'train.junk' = 'xxxxx"),  # the value is cut (test checks the length)
    ({"seeds": [0, 2**64]}, "'seeds' = [0, 18446744073709551616]: every seed must be an integer in [0, 2**63)"),
    ({"seeds": [2**63]}, "every seed must be an integer in [0, 2**63)"),
    ({"train": {"lr": float("inf")}}, "'train.lr' = inf: must be a finite number (not nan or inf)"),
    ({"train": {"weight_decay": float("inf")}}, "'train.weight_decay' = inf: must be a finite number"),
    ({"train": {"grad_clip": float("nan")}}, "'train.grad_clip' = nan: must be a finite number"),
    ({"train": {"grad_clip": float("-inf")}}, "'train.grad_clip' = -inf: must be a finite number"),
    ({"model": {"dropout": float("nan")}}, "'model.dropout' = nan: must be a finite number"),
    (
        {"variants": [{"name": "t", "router": "topk", "aux_loss_coef": float("inf")}]},
        "'variants[0].aux_loss_coef' = inf: must be a finite number",
    ),
    (
        {"variants": [{"name": "r", "router": "rdesi", "beta": float("nan")}]},
        "'variants[0].beta' = nan: must be a finite",
    ),
    (
        {
            "variants": [
                {"name": "t", "router": "topk"},
                {"name": "tl", "router": "topk", "train": {"max_steps": 3000}},
                {"name": "rdesi", "router": "rdesi"},  # config.yaml's ablation base
            ],
            "reference": "t",
            "ablation": {"variants": []},
            "statistics": {"contrasts": []},
            "findings": {"horizon": {"variant": "t", "longer": "tl", "max_gain": float("inf")}},
        },
        "'findings.horizon.max_gain' = inf: must be a number strictly between 0 and 1",
    ),
    ({"model": {"n_experts": 100_000}}, "'model.n_experts' = 100000: must be <= 4096"),
    (
        {"model": {"max_seq_len": 10**9, "positional": "learned"}},
        "'model.max_seq_len' = 1000000000: must be <= 1048576",
    ),
    ({"model": {"vocab_size": 10**8}}, "'model.vocab_size' = 100000000: must be <= 1048576"),
    ({"model": {"d_model": 2**20, "n_heads": 4}}, "'model.d_model' = 1048576: must be <= 65536"),
    ({"train": {"batch_size": 10**6}}, "'train.batch_size' = 1000000: must be <= 65536"),
    (
        {"model": {"max_seq_len": 2**63}},
        "'model.max_seq_len' = 9223372036854775808: must be an integer in (-2**63, 2**63)",
    ),
    (
        {"model": {"vocab_size": 2**20, "d_model": 2**14, "n_heads": 128}},
        "config key 'model' = '19,428,360,192 parameters': more than 8,589,934,592",
    ),
    (
        {"model": {"n_experts": 4096, "d_expert": 1024}},
        "'resources.train.mem_mb' = 3000: variant 'topk' needs an estimated",
    ),
    ({"train": {"batch_size": 4096}}, "'resources.train.mem_mb' = 3000: variant 'topk' needs an estimated"),
    (
        {"resources": {"evaluate": {"mem_mb": 100}}},
        "'resources.evaluate.mem_mb' = 100: variant 'topk' needs an estimated",
    ),
    (
        {"variants": [{"name": "topk\n", "router": "topk"}]},
        "'variants[0].name' = 'topk\\n': must start with a letter, contain only letters, digits and '_'",
    ),
    (
        {"variants": [{"name": "a" * 65, "router": "topk"}]},
        "'variants[0].name' = 'aaaaaaaaaa" + "a" * 55 + "': must start with a letter",
    ),
    ({"name": "../elsewhere"}, "config key 'name' = '../elsewhere': must start with a letter"),
]


def test_statistics_settings_reach_the_analysis_through_the_study_record(tmp_path):
    """The dry run resolves the study once into results/<name>/study.json; every analysis command reads that
    record and nothing else of the config (no design, reference or settings on its command line)."""
    study = copy_checkout(tmp_path / "study")
    override = {
        "statistics": {"primary": ["ppl", "cv"], "alpha": 0.01, "power": 0.9, "margins": {"cv": {"absolute": 0.05}}}
    }
    done = snakemake(
        "--dry-run", "--forceall", "--printshellcmds", "--configfile", write_override(tmp_path, override), cwd=study
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((study / "results/default/study.json").read_text())
    assert {k: record["statistics"][k] for k in ("primary", "alpha", "power", "split")} == {
        "primary": ["ppl", "cv"],
        "alpha": 0.01,
        "power": 0.9,
        "split": "test",
    }
    assert record["statistics"]["contrasts"] == [["rdesi", "lossfree"], ["rdesi", "topk"], ["lossfree", "topk"]]
    assert record["statistics"]["margins"]["cv"] == {"absolute": 0.05} and "ppl" in record["statistics"]["margins"]
    assert record["variants"]["rdesi"]["options"]["gamma"] == 1.0
    commands = [line for line in done.stdout.splitlines() if "python -m analysis" in line]
    assert len(commands) >= 5
    for command in commands:
        assert "--study results/default/study.json" in command, command
        assert not {"--primary", "--alpha", "--reference", "--design-json"} & set(shlex.split(command)), command


def test_the_default_config_is_valid():
    check_like_the_snakefile(merged_config({}))
    for preset in ("smoke", "gpu"):
        check_like_the_snakefile(merged_config(yaml.safe_load((REPO / f"workflow/presets/{preset}.yaml").read_text())))


@pytest.mark.parametrize("override, message", BAD_INPUTS)
def test_bad_config_is_rejected_naming_the_key(override, message):
    from gtmoe.config import ConfigError

    with pytest.raises(Exception) as caught:
        check_like_the_snakefile(merged_config(override))
    assert message in str(caught.value)
    if isinstance(caught.value, ConfigError):  # one short line: long values are cut
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 500, str(caught.value)


@pytest.mark.parametrize("name", ["topk\n", "a" * 65, "a/b", "1a", ""])
def test_variant_names_are_full_matched_and_bounded_without_the_schema(name):
    """The JSON schema searches its pattern (`$` also matches before a final newline): gtmoe.study fullmatches."""
    from gtmoe.config import ConfigError
    from gtmoe.study import Study

    config = merged_config(
        {"reference": "a" * 64, "ablation": {"base": None, "variants": []}, "statistics": {"contrasts": []}}
    )
    config["variants"] = [{"name": "a" * 64, "router": "topk"}]
    Study.from_config(config)  # 64 characters are fine
    config["variants"].append({"name": name, "router": "topk"})
    with pytest.raises(ConfigError, match=r"'variants\[1\].name' = .*: must start with a letter.* at most 64"):
        Study.from_config(config)


def dry_run_too(*messages: str) -> list:
    """The BAD_INPUTS rows with these messages: the dry-run test repeats them through Snakemake itself."""
    return [case for case in BAD_INPUTS if case[1] in messages]


@pytest.mark.parametrize(
    "override, message",
    [BAD_INPUTS[0], BAD_INPUTS[5], BAD_INPUTS[7], BAD_INPUTS[13]]
    + dry_run_too(
        "override.yaml line 3: invalid YAML: duplicate key 'lr' (first on line 2)",
        "override.yaml line 2: invalid YAML: YAML anchor &a is not accepted",
        "'train.lr' = inf: must be a finite number (not nan or inf)",
        "'model.n_experts' = 100000: must be <= 4096",
        "'resources.train.mem_mb' = 3000: variant 'topk' needs an estimated",
        "'variants[0].name' = 'topk\\n': must start with a letter, contain only letters, digits and '_'",
        "'variants[0].name' = 'aaaaaaaaaa" + "a" * 55 + "': must start with a letter",
        "config key 'name' = '../elsewhere': must start with a letter",
    ),
)
def test_bad_config_stops_snakemake_before_any_job(tmp_path, override, message):
    done = snakemake("--dry-run", "--configfile", write_override(tmp_path, override))
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "Job stats" not in done.stdout  # nothing was scheduled


@pytest.fixture(scope="module")
def smoke_study(finished_smoke, tmp_path_factory):
    """This module's copy of the finished smoke study (its checkout also holds another study's files, DECOYS:
    nothing of the smoke study may read them)."""
    return copy_study(finished_smoke, tmp_path_factory.mktemp("smoke"))


@pytest.mark.integration
def test_smoke_study_writes_every_declared_output(smoke_study):
    smoke = yaml.safe_load((smoke_study / SMOKE).read_text())
    variants = [*(v["name"] for v in smoke["variants"]), *SMOKE_SWEEP_POINTS]
    for variant in variants:
        for seed in smoke["seeds"]:
            run = smoke_study / "results" / "smoke" / "runs" / variant / f"seed{seed}"
            for name in RUN_FILES:
                assert (run / name).stat().st_size > 0, run / name
            result = json.loads((run / "eval_test.json").read_text())
            assert (result["variant"], result["seed"], result["split"]) == (variant, seed, "test")
            assert (smoke_study / "results" / "smoke" / "logs" / "train" / variant / f"seed{seed}.log").exists()
            assert (smoke_study / "results" / "smoke" / "benchmarks" / "train" / variant / f"seed{seed}.tsv").exists()
    for name in SUMMARY_FILES:
        assert (smoke_study / "results" / "smoke" / "summary" / name).stat().st_size > 0, name
    status = (smoke_study / "results" / "smoke" / "summary" / "run_status.csv").read_text()
    assert status.count(",ok") == len(variants) * len(smoke["seeds"])
    assert (smoke_study / "results" / "smoke" / "figures" / f"sensitivity_{SMOKE_SWEEP}.png").stat().st_size > 0


def report_results(html: str) -> dict:
    """The `results` object the Snakemake report app embeds: path -> entry (with a base64 data URI)."""
    start = re.search(r'var results =\s*(?=\{")', html).end()  # not the bundled libraries' `results`
    return json.JSONDecoder().raw_decode(html, start)[0]


@pytest.mark.integration
def test_report_embeds_every_figure(smoke_study):
    results = report_results((smoke_study / "results" / "smoke" / "report.html").read_text())
    for figure in (*FIGURES, f"sensitivity_{SMOKE_SWEEP}"):
        path = f"results/smoke/figures/{figure}.png"
        assert (smoke_study / path).stat().st_size > 0
        # The report carries each figure's PNG bytes (base64), not a link to the file.
        uri = results[path]["data_uri"]
        assert uri.startswith("data:image/png") and ";base64,iVBORw0KGgo" in uri, figure
    for table in ("summary", "comparisons", "ablations", "run_status", "sensitivity", "sensitivity_best"):
        assert f"results/smoke/summary/{table}.html" in results, table
    # What the experts learned: its own category, with its figures and tables.
    categories = report_variable((smoke_study / "results" / "smoke" / "report.html").read_text(), "categories")
    assert "Specialisation" in categories
    specialisation = [f"figures/{name}.png" for name in ("coactivation", "routing_stability", "seed_agreement")]
    specialisation += [f"summary/{name}.html" for name in ("specialisation", "vocabulary", "seed_agreement")]
    for path in specialisation:
        assert f"results/smoke/{path}" in results, path
    # Only this study's files: another study's tables under results/ never reach its report or findings.
    assert [path for path in results if not path.startswith("results/smoke/")] == []
    assert "DECOY" not in (smoke_study / "results" / "smoke" / "summary" / "findings.html").read_text()
    assert all((smoke_study / decoy).read_text() == "DECOY\n" for decoy in DECOYS)
    # Every run's evaluation, labelled by variant, seed and split.
    smoke = yaml.safe_load((smoke_study / SMOKE).read_text())
    for variant in (v["name"] for v in smoke["variants"]):
        for seed in smoke["seeds"]:
            entry = results[f"results/smoke/runs/{variant}/seed{seed}/eval_test.json"]
            assert entry["labels"] == {"variant": variant, "seed": str(seed), "split": "test"}, entry["labels"]


def report_variable(html: str, name: str):
    """A JSON value the Snakemake report app embeds as ``var name = ...``."""
    start = re.search(rf"var {name} =\s*", html).end()
    return json.JSONDecoder().raw_decode(html, start)[0]


@pytest.mark.integration
def test_findings_come_first_in_the_report(smoke_study):
    html = (smoke_study / "results" / "smoke" / "report.html").read_text()
    entry = report_results(html)["results/smoke/summary/findings.html"]
    assert entry["data_uri"].startswith("data:text/html")
    # The app lists categories sorted with JavaScript's localeCompare (menu.js): sort them the same way.
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot sort like the report's JavaScript")
    categories = list(report_variable(html, "categories"))
    script = "console.log(JSON.stringify(JSON.parse(process.argv[1]).sort((a, b) => a.localeCompare(b))))"
    ordered = json.loads(
        subprocess.run([node, "-e", script, json.dumps(categories)], capture_output=True, text=True, check=True).stdout
    )
    assert ordered[0] == "★ Findings", ordered
    # The landing page (workflow description) opens the findings in one click: the one entry whose path ends
    # in /summary/findings.html (the description is shared by every study, whatever its root).
    description = report_variable(html, "workflow_desc")
    link = re.search(r"contentPath:(results\[.*?\]\.data_uri)\}\)", description).group(1)
    # The link's own JavaScript, run on the report's `results`, finds this study's findings page.
    script = f"const results = JSON.parse(require('fs').readFileSync(0, 'utf8')); console.log({link}.slice(0, 40))"
    found = subprocess.run(
        [node, "-e", script], input=json.dumps(report_results(html)), capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == entry["data_uri"][:40]


@pytest.mark.integration
def test_compute_breakdown_adds_up_the_benchmark_files(smoke_study):
    table = pd.read_csv(smoke_study / "results" / "smoke" / "summary" / "compute.csv")
    benchmarks = smoke_study / "results" / "smoke" / "benchmarks"
    counted = [path for path in benchmarks.rglob("*.tsv") if path.name != "compute.tsv"]
    total = sum(float(pd.read_csv(path, sep="\t")["s"].sum()) for path in counted)
    assert table.iloc[-1]["stage"] == "total" and table.iloc[-1]["jobs"] == len(counted)
    assert table.iloc[-1]["seconds"] == pytest.approx(total)
    stages = set(table.loc[table["part"] == "all", "stage"])
    assert {"data prep", "training", "evaluation", "analysis", "total"} <= stages


@pytest.mark.integration
def test_report_shows_a_figure_in_a_browser(smoke_study, tmp_path):
    from PIL import Image

    from browser import find_chromium, screenshot

    if find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    # Open the report as a reader would, then navigate its app to the load heatmap.
    html = (smoke_study / "results" / "smoke" / "report.html").read_text()
    driver = (
        "<script>window.addEventListener('load', () => setTimeout(() => {"
        "app.showCategory('Load balance'); app.setView({content: 'img', contentPath: "
        "results['results/smoke/figures/load_heatmap.png'].data_uri}); }, 300));</script>"
    )
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
    aggregates = {rule: n for rule, n in AFTER_EVALUATION.items() if rule != "all"}
    # The file-target form: force one run's training; its evaluations and the aggregates follow.
    forced = snakemake(
        "--dry-run",
        "--forcerun",
        f"results/smoke/runs/{second}/seed0/checkpoint.pt",
        "--configfile",
        SMOKE,
        cwd=smoke_study,
    )
    assert job_counts(forced.stdout) == {"train": 1, "evaluate": 1, **aggregates, "all": 1}
    # A variant target after its runs were removed: those runs, the aggregates, nothing else.
    for seed in smoke["seeds"]:
        shutil.rmtree(smoke_study / "results" / "smoke" / "runs" / first / f"seed{seed}")
    plan = snakemake("--dry-run", first, "--configfile", SMOKE, cwd=smoke_study)
    runs = len(smoke["seeds"])
    assert job_counts(plan.stdout) == {"train": runs, "evaluate": runs, **aggregates, first: 1}


# --------------------------------------------------------------- no config value is parsed by a shell
# Valid shell that creates files four ways if a shell ever parses it (substitution, backticks, `;`, a
# redirection), with quotes, spaces and globs; legal in a directory name (no '/'), so a real data.local_dir.
HOSTILE = "we ird $(touch PWNED_DOLLAR) `touch PWNED_TICK`; touch PWNED_SEMI && echo 'sq' \"dq\" * ? > PWNED_REDIRECT"
PWNED = "PWNED_"
# Every string-valued config key (test_every_string_config_key_is_covered keeps this list complete):
# its hostile override, and None if the value reaches a rule, else the text of its parse-time rejection.
TOPK = {"name": "topk", "router": "topk"}
HOSTILE_CASES = {
    "data.local_dir": ({"data": {"local_dir": HOSTILE}}, None),
    "data.corpus": ({"data": {"corpus": HOSTILE}}, "is not one of ['wikitext-2', 'wikitext-103']"),
    "data.source": ({"data": {"source": HOSTILE}}, "is not one of ['auto', 'local', 'hub']"),
    "model.positional": ({"model": {"positional": HOSTILE}}, "must be 'rope' or 'learned'"),
    "train.device": ({"train": {"device": HOSTILE}}, "must be 'auto', 'cpu' or 'cuda'"),
    "train.nonfinite": ({"train": {"nonfinite": HOSTILE}}, "must be 'stop' or 'skip'"),
    "name": ({"name": HOSTILE}, "config key 'name'"),
    "stage": ({"stage": HOSTILE}, "is not one of ['confirmation', 'tuning']"),
    "eval_splits[]": ({"eval_splits": [HOSTILE, "test"]}, "is not one of ['validation', 'test']"),
    "tuning.select.minimize": ({"tuning": {"select": {"minimize": HOSTILE}}}, "'tuning.select.minimize'"),
    "variants[].name": ({"variants": [TOPK, {"name": HOSTILE, "router": "topk"}]}, "'variants[1].name'"),
    "variants[].router": ({"variants": [TOPK, {"name": "r", "router": HOSTILE}]}, "unknown router"),
    "variants[].performance": (
        {"variants": [TOPK, {"name": "r", "router": "rdesi", "performance": HOSTILE}]},
        "'variants[1].performance'",
    ),
    "variants[].aux_loss_scope": (
        {"variants": [TOPK, {"name": "r", "router": "topk", "aux_loss_scope": HOSTILE}]},
        "'variants[1].aux_loss_scope'",
    ),
    "variants[].capacity_policy": (
        {"variants": [TOPK, {"name": "r", "router": "topk", "capacity_policy": HOSTILE}]},
        "'variants[1].capacity_policy'",
    ),
    "variants[].score_function": (
        {"variants": [TOPK, {"name": "r", "router": "lossfree", "score_function": HOSTILE}]},
        "'variants[1].score_function'",
    ),
    "variants[].bias_on": (
        {"variants": [TOPK, {"name": "r", "router": "lossfree", "bias_on": HOSTILE}]},
        "'variants[1].bias_on'",
    ),
    "variants[].eval_routing": (
        {"variants": [TOPK, {"name": "r", "router": "expert_choice", "eval_routing": HOSTILE}]},
        "'variants[1].eval_routing'",
    ),
    "variants[].group_score": (
        {"variants": [TOPK, {"name": "r", "router": "group_limited", "group_score": HOSTILE}]},
        "'variants[1].group_score'",
    ),
    "reference": ({"reference": HOSTILE}, "'reference'"),
    "ablation.base": ({"ablation": {"base": HOSTILE}}, "'ablation.base'"),
    "ablation.variants[]": ({"ablation": {"variants": [HOSTILE]}}, "'ablation.variants'"),
    "statistics.primary[]": ({"statistics": {"primary": [HOSTILE]}}, "'statistics.primary'"),
    "statistics.contrasts[][]": ({"statistics": {"contrasts": [["rdesi", HOSTILE]]}}, "'statistics.contrasts[0]'"),
    "statistics.split": ({"statistics": {"split": HOSTILE}}, "is not one of ['validation', 'test']"),
    "sweeps[].name": ({"sweeps": [{"name": HOSTILE, "base": "rdesi", "grid": {"c": [0]}}]}, "'sweeps[0].name'"),
    "sweeps[].base": ({"sweeps": [{"name": "s", "base": HOSTILE, "grid": {"c": [0]}}]}, "'sweeps[0].base'"),
    "sweeps[].mode": (
        {"sweeps": [{"name": "s", "base": "rdesi", "mode": HOSTILE, "grid": {"c": [0]}}]},
        "is not one of ['one_at_a_time', 'full']",
    ),
    "sweeps[].grid.*[]": (
        {"sweeps": [{"name": "s", "base": "rdesi", "grid": {"performance": [HOSTILE]}}]},
        "is not of type 'number'",
    ),
    "resources.*.gpu_model": (
        {"resources": {"train": {"threads": 1, "mem_mb": 3000, "runtime": 30, "gpu": 1, "gpu_model": HOSTILE}}},
        "does not match",
    ),
}


def string_keys(value, prefix: str = ""):
    """Dotted paths of the string leaves of a config (list items as `[]`)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from string_keys(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for item in value:
            yield from string_keys(item, f"{prefix}[]")
    elif isinstance(value, str):
        yield prefix


def test_every_string_config_key_is_covered():
    import dataclasses
    import typing

    from gtmoe import routers
    from gtmoe.config import ModelConfig, TrainConfig

    keys = set()
    for preset in (None, "smoke", "gpu"):
        override = yaml.safe_load((REPO / f"workflow/presets/{preset}.yaml").read_text()) if preset else {}
        keys |= {re.sub(r"^resources\.\w+\.", "resources.*.", key) for key in string_keys(merged_config(override))}
    typed = [("model", ModelConfig), ("train", TrainConfig)]
    typed += [("variants[]", routers.get(name).Config) for name in routers.known()]
    for prefix, cls in typed:
        hints = typing.get_type_hints(cls)
        keys |= {f"{prefix}.{f.name}" for f in dataclasses.fields(cls) if hints[f.name] is str}
    assert keys - set(HOSTILE_CASES) == set(), "add these string keys to HOSTILE_CASES"


@pytest.mark.parametrize("key", [key for key, (_, rejected) in HOSTILE_CASES.items() if rejected])
def test_a_hostile_string_is_rejected_at_parse_time_where_it_cannot_be_a_value(key):
    override, message = HOSTILE_CASES[key]
    with pytest.raises(Exception) as caught:
        check_like_the_snakefile(merged_config(override))
    assert message in str(caught.value)


def assert_one_word_each(commands: list[str], value: str) -> list[list[str]]:
    """Each command split as a POSIX shell splits it; wherever `value` shows, it is whole inside one word."""
    split = [shlex.split(command) for command in commands]
    for words in split:
        for word in words:
            assert PWNED not in word or value in word, f"{value!r} was split by the shell: {words}"
    return split


@pytest.mark.parametrize("key", [key for key, (_, rejected) in HOSTILE_CASES.items() if rejected is None])
def test_a_hostile_config_value_reaches_its_rule_as_one_quoted_word(tmp_path, key):
    override, _ = HOSTILE_CASES[key]
    done = snakemake("--dry-run", "--forceall", "--printshellcmds", "--configfile", write_override(tmp_path, override))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    commands = [line.split(":", 1)[1] for line in done.stdout.splitlines() if line.startswith("Shell command:")]
    split = assert_one_word_each(commands, HOSTILE)
    assert sum(HOSTILE in word for words in split for word in words) >= 1, "the value reaches no rule"
    corpus = next(words for words in split if words[1:4] == ["-m", "gtmoe", "prepare"])
    assert corpus[corpus.index("--local-dir") + 1] == HOSTILE


def test_a_data_directory_with_shell_characters_is_read_and_runs_nothing(tmp_path):
    """The corpus job run for real: the study and data directories have spaces and shell syntax in their
    names; the corpus is read from there and no command hidden in the name runs."""
    local = tmp_path / HOSTILE
    local.mkdir()
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (local / name).symlink_to(WIKITEXT / name)
    study = tmp_path / "a study; $(touch PWNED_STUDY)"
    copy_checkout(study)
    before = {path for path in study.rglob("*")}
    done = snakemake(
        "results/default/data/corpus/corpus.json",
        "--cores",
        "1",
        "--configfile",
        write_override(tmp_path, {"data": {"local_dir": str(local)}}),
        cwd=study,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((study / "results/default/data/corpus/corpus.json").read_text())
    created = {path for path in study.rglob("*") if path not in before}
    outside = [path for path in created if path.relative_to(study).parts[0] not in ("results", ".snakemake")]
    assert outside == []
    assert [path for path in tmp_path.rglob(f"{PWNED}*")] == []


# --------------------------------------------------------------- precise reruns
@pytest.fixture(scope="module")
def recorded_study(tmp_path_factory):
    """The smoke preset's study with every output present (placeholders) and recorded by Snakemake as
    built with the current settings (`--touch` writes the metadata a real run writes: params, code, input):
    a dry run then shows what an edit would rerun, in seconds instead of a real study's minutes."""
    from gtmoe.data import train_tokenizer

    study = copy_checkout(tmp_path_factory.mktemp("recorded") / "study")
    summary = snakemake("--summary", "--configfile", SMOKE, cwd=study)
    assert summary.returncode == 0, summary.stderr[-2000:]
    outputs = [line.split("\t")[0] for line in summary.stdout.splitlines()[1:] if "\t" in line]
    plan = snakemake("--dry-run", "--forceall", "--configfile", SMOKE, cwd=study).stdout.splitlines()
    compute = next(i for i, line in enumerate(plan) if line.split()[-1:] == ["compute:"])
    inputs = plan[compute + 1].split("input: ", 1)[1].split(", ")  # the compute job's inputs: benchmark files
    benchmarks = [path for path in inputs if "/benchmarks/" in path]
    for name in outputs + benchmarks:
        path = study / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent == study / "results" / "smoke" / "data" / "shards":
            path.mkdir()
        elif path.name == "tokenizer.json":  # checked when the workflow is parsed: must be a real one
            train_tokenizer(["a small corpus"] * 3, 300, path)
        else:
            path.touch()
    write_run_configs(study, (REPO / SMOKE).read_text())  # real run configs: the parse-time reuse check reads them
    touched = snakemake("--touch", "--cores", "1", "--configfile", SMOKE, cwd=study)
    assert touched.returncode == 0, touched.stdout[-2000:] + touched.stderr[-2000:]
    again = snakemake("--dry-run", "--configfile", SMOKE, cwd=study)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    return study


AFTER_EVALUATION = {
    "aggregate": 1,
    "statistics": 1,
    "figures": 1,
    "findings": 1,
    "compute": 1,
    "specialisation": 1,
    "sensitivity": 1,
    "report": 1,  # rebuilt whenever a file it embeds changes
    "all": 1,
}
SMOKE_RUNS = 8  # (topk, rdesi and the sweep's two points) x 2 seeds
# An edit of the smoke preset, and the jobs a dry run must plan: each kind of setting reruns what reads it.
RERUN_CASES = [
    ({"eval": {"max_blocks": {"validation": 128, "test": 256}}}, {"evaluate": SMOKE_RUNS, **AFTER_EVALUATION}),
    ({"eval": {"saturation_blocks": 64}}, {"evaluate": SMOKE_RUNS, **AFTER_EVALUATION}),
    ({"train": {"log_every": 4}}, {}),
    ({"train": {"router_log_every": 5}}, {}),
    ({"train": {"checkpoint_every": 5}}, {}),
    # Routing snapshots (5 in the smoke preset): another number retrains nothing (the runs keep the snapshots they
    # took); off, no run reads the validation shards any more (an input of train less), so each retrains; the
    # probe's size is an eval setting.
    ({"train": {"routing_snapshots": 4}}, {}),
    ({"train": {"routing_snapshots": 0}}, {"train": SMOKE_RUNS, "evaluate": SMOKE_RUNS, **AFTER_EVALUATION}),
    ({"eval": {"probe_blocks": 8}}, {"evaluate": SMOKE_RUNS, **AFTER_EVALUATION}),
    # (compute sums up the benchmark files, so it follows every job that reruns)
    (  # a variant with its own train settings (the horizon check's longer run): exactly its runs are new
        {
            "variants": [
                {"name": "topk", "router": "topk"},
                {"name": "rdesi", "router": "rdesi"},
                {"name": "topk_long", "router": "topk", "train": {"max_steps": 40}},
            ],
            "findings": {"horizon": {"variant": "topk", "longer": "topk_long", "max_gain": 0.05}},
        },
        {"train": 2, "evaluate": 2, **AFTER_EVALUATION},
    ),
    (
        {"statistics": {"alpha": 0.01}},
        {"statistics": 1, "figures": 1, "findings": 1, "specialisation": 1, "compute": 1, "report": 1, "all": 1},
    ),
    # Settings that do change the weights still retrain, and only the runs they concern.
    ({"train": {"lr": 0.002}}, {"train": SMOKE_RUNS, "evaluate": SMOKE_RUNS, **AFTER_EVALUATION}),
    # rdesi and its sweep's points (rdesi with another c) change; topk does not.
    (
        {"variants": [{"name": "topk", "router": "topk"}, {"name": "rdesi", "router": "rdesi", "beta": 0.2}]},
        {"train": 6, "evaluate": 6, **AFTER_EVALUATION},
    ),
    # A new sweep value trains only its point; only the sensitivity tables change otherwise.
    (
        {"sweeps": [{"name": "rdesi_bonus", "base": "rdesi", "grid": {"c": [0, 30, 300]}}]},
        {"train": 2, "evaluate": 2, **AFTER_EVALUATION},
    ),
]


@pytest.mark.parametrize("edit, planned", RERUN_CASES, ids=[json.dumps(edit)[:60] for edit, _ in RERUN_CASES])
def test_an_edit_reruns_only_what_depends_on_it(recorded_study, tmp_path, edit, planned):
    smoke = yaml.safe_load((recorded_study / SMOKE).read_text())
    for section, values in edit.items():
        smoke[section] = {**smoke.get(section, {}), **values} if isinstance(values, dict) else values
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(smoke))  # sorts the keys: reordering them must rerun nothing either
    plan = snakemake("--dry-run", "--configfile", str(edited), cwd=recorded_study)
    assert plan.returncode == 0, plan.stderr[-2000:]
    output = plan.stdout + plan.stderr
    assert (job_counts(plan.stdout) if "Job stats" in plan.stdout else {}) == planned, output[-3000:]
    if not planned:
        assert "Nothing to be done" in output


def test_another_study_builds_under_its_own_root_and_leaves_this_one_alone(recorded_study, tmp_path):
    """Switching studies (a preset, or another `name`) never retrains or overwrites this study's runs."""
    study = tmp_path / "study"
    shutil.copytree(recorded_study, study, symlinks=True)  # keeps mtimes and Snakemake's records
    other = write_override(tmp_path, {"name": "other"})
    plan = snakemake("--dry-run", "--configfile", SMOKE, other, cwd=study)
    assert plan.returncode == 0, plan.stderr[-2000:]
    outputs = [
        path
        for line in plan.stdout.splitlines()
        if line.strip().startswith("output:")
        for path in line.split("output:", 1)[1].strip().split(", ")
    ]
    assert outputs and all(path.startswith("results/other/") for path in outputs), outputs
    assert job_counts(plan.stdout)["train"] == SMOKE_RUNS  # its own runs: none of the smoke study's is reused
    again = snakemake("--dry-run", "--configfile", SMOKE, cwd=study)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]


def test_a_sweep_target_builds_exactly_its_runs_and_the_aggregates(recorded_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(recorded_study, study, symlinks=True)  # keeps mtimes and Snakemake's records
    for variant in SMOKE_SWEEP_POINTS:
        shutil.rmtree(study / "results" / "smoke" / "runs" / variant)
    plan = snakemake("--dry-run", SMOKE_SWEEP, "--configfile", SMOKE, cwd=study)
    assert plan.returncode == 0, plan.stderr[-2000:]
    aggregates = {rule: n for rule, n in AFTER_EVALUATION.items() if rule != "all"}
    assert job_counts(plan.stdout) == {"train": 4, "evaluate": 4, **aggregates, SMOKE_SWEEP: 1}
    # One point's own target: its runs (and the aggregates, which read every run).
    point = snakemake("--dry-run", SMOKE_SWEEP_POINTS[1], "--configfile", SMOKE, cwd=study)
    assert job_counts(point.stdout)["train"] == 4  # both points are missing, and the aggregates need both
    assert f"results/smoke/runs/{SMOKE_SWEEP_POINTS[1]}/seed1/checkpoint.pt" in point.stdout


@pytest.mark.parametrize("name, key", [("train", "variants[0].name"), ("compute", "sweeps[0].name")])
def test_a_target_named_like_a_rule_stops_snakemake(tmp_path, name, key):
    override = {
        "variants": [{"name": "topk", "router": "topk"}, {"name": "rdesi", "router": "rdesi"}],
        "ablation": {"base": "rdesi", "variants": []},
        "reference": "topk",
        "sweeps": [{"name": "s", "base": "rdesi", "grid": {"c": [0]}}],
        "statistics": {"contrasts": []},
    }
    if key.startswith("variants"):
        override["variants"][0]["name"] = override["reference"] = name
    else:
        override["sweeps"][0]["name"] = name
    done = snakemake("--dry-run", "--configfile", write_override(tmp_path, override))
    assert done.returncode != 0
    assert f"config key '{key}' = '{name}': is a workflow rule name" in done.stdout + done.stderr
