"""What the experts learned, in the analysis: co-activation by rank and the vocabulary table against brute-force
computations, the figure and tables on synthetic data, the findings' sentences built from the summary's numbers,
and the step end to end, where evaluations written before these metrics existed are missing values, not errors."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import collect, findings, outputs, tables
from analysis.__main__ import main
from analysis.figures import coactivation as figure
from analysis.stats import specialisation
from gtmoe.contract import SPECIALISATION_METRICS, STABILITY_METRICS, UTILISATION_METRICS

from helpers import PROBE_VALID, tidy_table, write_baselines, write_run, write_study_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 2_000 and path.read_bytes()[:8] == PNG_MAGIC


def cocounts(rng: np.random.Generator, n_experts: int = 4, k: int = 2, tokens: int = 60) -> list[list[int]]:
    """Co-activation counts of a random top-k routing, as an evaluation JSON holds them."""
    counts = np.zeros((n_experts, n_experts), dtype=int)
    weights = rng.dirichlet(np.ones(n_experts))
    for _ in range(tokens):
        experts = rng.choice(n_experts, size=k, replace=False, p=weights)
        for i in experts:
            for j in experts:
                counts[i, j] += 1
    return counts.tolist()


@pytest.fixture(scope="module")
def arrays() -> pd.DataFrame:
    """Layer arrays as collect.load_layer_arrays returns them: topk (seeds 2 and 1, two layers), lossfree (one seed,
    one layer without co-activation counts: evaluated before them) and rdesi (no counts at all)."""
    rng = np.random.default_rng(7)
    rows = []
    for variant, seeds in (("topk", (2, 1)), ("lossfree", (3,)), ("rdesi", (0,))):
        for seed in seeds:
            for layer in (0, 1):
                matrix = cocounts(rng)
                old = variant == "rdesi" or (variant == "lossfree" and layer == 1)
                load = [row[i] for i, row in enumerate(matrix)]
                top = [list(rng.permutation(20)[:5]) for _ in load]
                counts = [sorted(rng.integers(0, c // 3 + 1, size=5).tolist(), reverse=True) for c in load]
                rows.append(
                    dict(
                        variant=variant,
                        seed=seed,
                        layer=layer,
                        load=load,
                        coactivation=None if old else matrix,
                        top_tokens=None if variant == "rdesi" else top,
                        top_token_counts=None if variant == "rdesi" else counts,
                    )
                )
    frame = pd.DataFrame(rows, columns=collect.LAYER_ARRAY_COLUMNS)
    return frame.assign(variant=pd.Categorical(frame["variant"], ["dense", "topk", "lossfree", "rdesi"], ordered=True))


def brute_by_rank(arrays: pd.DataFrame) -> dict:
    """{(variant, rank, partner rank): (mean share, matrices)} by loops: each matrix's experts ranked by their tokens
    (ties: the lower index first), share = C[i, j] / C[i, i], averaged over the matrices that define the cell."""
    cells = defaultdict(list)
    for row in arrays.itertuples():
        if row.coactivation is None:
            continue
        counts = row.coactivation
        n = len(counts)
        order = sorted(range(n), key=lambda i: (-counts[i][i], i))
        for rank, i in enumerate(order, start=1):
            for partner, j in enumerate(order, start=1):
                if i != j and counts[i][i] > 0:
                    cells[(str(row.variant), rank, partner)].append(counts[i][j] / counts[i][i])
    return {key: (sum(values) / len(values), len(values)) for key, values in cells.items()}


def test_coactivation_by_rank_averages_the_ranked_shares_over_seeds_and_layers(arrays):
    shares, panels = specialisation.coactivation_by_rank(arrays)
    expected = brute_by_rank(arrays)
    got = {
        (r.variant, r.rank, r.partner_rank): (r.share, r.n_matrices)
        for r in shares.itertuples()
        if r.rank != r.partner_rank
    }
    assert got.keys() == expected.keys()
    assert [got[key][0] for key in expected] == pytest.approx([value for value, _ in expected.values()])
    assert [got[key][1] for key in expected] == [n for _, n in expected.values()]
    diagonal = shares[shares["rank"] == shares["partner_rank"]]
    assert diagonal["share"].isna().all() and (diagonal["n_matrices"] == 0).all()
    # Study order; rdesi has no counts; lossfree's second layer was evaluated before them.
    assert list(panels["variant"]) == ["topk", "lossfree"]
    topk = panels.set_index("variant").loc["topk"]
    assert (topk.n_seeds, topk.n_layers, topk.n_matrices, topk.n_experts) == (2, 2, 4, 4)
    # A top-2 router without drops: each row sums to k - 1 = 1, so an independent cell would be 1 / (E - 1).
    assert topk.partners_per_token == pytest.approx(1.0) and topk.independent == pytest.approx(1 / 3)
    assert panels.set_index("variant").loc["lossfree", "n_layers"] == 1


def test_no_counts_anywhere_give_empty_tables_and_the_message_figure(arrays, tmp_path):
    old = arrays.assign(coactivation=None, top_tokens=None, top_token_counts=None)
    shares, panels = specialisation.coactivation_by_rank(old)
    assert shares.empty and panels.empty
    assert specialisation.vocabulary_table(old, None).empty
    assert is_png(figure.plot_coactivation(shares, panels, tmp_path / "none.png"))
    written = tables.write_vocabulary(specialisation.vocabulary_table(old, None), tmp_path / "v", 10, "test", None)
    assert "No routed run with top token ids" in written[-1].read_text()


def test_the_figure_has_a_panel_per_variant_and_names_those_without_counts(arrays, tmp_path, monkeypatch):
    labels = []
    monkeypatch.setattr(figure.plt.Figure, "supxlabel", lambda fig, text, **kw: labels.append(text))
    path = figure.plot_coactivation(*specialisation.coactivation_by_rank(arrays), tmp_path / "c.png", ["rdesi"])
    assert is_png(path) and len(labels) == 1 and labels[0].endswith(": rdesi")


def test_the_vocabulary_table_is_the_lowest_seed_and_last_layer_busiest_expert_first(arrays):
    table = specialisation.vocabulary_table(arrays, lambda token: f"tok{token}")
    assert list(dict.fromkeys(table["variant"])) == ["topk", "lossfree"]  # rdesi has no top tokens
    topk = table[table["variant"] == "topk"]
    assert set(topk["seed"]) == {1} and set(topk["layer"]) == {1}
    entry = arrays[(arrays["variant"] == "topk") & (arrays["seed"] == 1) & (arrays["layer"] == 1)].iloc[0]
    load = entry["load"]
    assert list(topk["expert"]) == sorted(range(len(load)), key=lambda e: (-load[e], e))
    for row in topk.itertuples():
        counts = entry["top_token_counts"][row.expert]
        assert row.load_share == pytest.approx(load[row.expert] / sum(load))
        assert row.top_token_share == pytest.approx(sum(counts) / load[row.expert])
        shown = [f"tok{t} ({c})" for t, c in zip(entry["top_tokens"][row.expert], counts) if c > 0]
        assert row.tokens == " · ".join(shown)


def test_token_ids_are_decoded_with_the_studys_tokenizer(tmp_path):
    from gtmoe.data import train_tokenizer

    path = tmp_path / "tokenizer.json"
    tokenizer = train_tokenizer(["the cat sat on the mat\n"] * 20, 300, path)
    decode = collect.read_tokenizer(path)
    the = tokenizer.encode(" the").ids
    assert len(the) == 1 and decode(the[0]) == "␣the"
    assert decode(tokenizer.token_to_id("<|endoftext|>")) == "<|endoftext|>"  # special tokens shown too
    assert collect.read_tokenizer(tmp_path / "absent.json") is None
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(collect.DataError, match="broken.json is unreadable"):
        collect.read_tokenizer(tmp_path / "broken.json")


def summary_of(values: dict[str, dict[str, dict[int, float]]]) -> pd.DataFrame:
    from analysis import stats

    tidy = tidy_table(values)
    tidy["variant"] = pd.Categorical(tidy["variant"], categories=list(values), ordered=True)
    return stats.summarize(tidy, stats.SUMMARY_METRICS, ["test"])


def test_the_table_is_the_summarys_rows_labelled_exploratory_unless_declared(tmp_path):
    summary = summary_of(
        {
            "dense": {"ppl": {0: 50.0, 1: 51.0}},
            "topk": {"ppl": {0: 40.0}, "coactivation_max": {0: 0.3, 1: 0.4}, "utilisation_p95": {0: 1.5, 1: 1.7}},
        }
    )
    table = specialisation.specialisation_summary(summary, primary=["ppl", "utilisation_p95"])
    assert set(table["metric"]) == set(specialisation.METRICS)  # every metric, n = 0 where there is none
    labels = dict(zip(table["metric"], table["label"]))
    assert labels["utilisation_p95"] == "primary" and labels["coactivation_max"] == "exploratory"
    topk = table[(table["variant"] == "topk") & (table["metric"] == "coactivation_max")].iloc[0]
    assert (topk["n"], topk["mean"]) == (2, pytest.approx(0.35))  # the summary's numbers, not recomputed
    page = tables.write_specialisation(table, tmp_path / "s", "test")[-1].read_text()
    assert "Declared primary endpoints among them: utilisation p95 (E·f)" in page and "n/a" in page


def test_the_findings_give_one_sentence_per_analysis_from_the_numbers():
    values = {
        "dense": {"ppl": {0: 50.0, 1: 52.0}},
        "topk": {
            "coactivation_max": {0: 0.30, 1: 0.40},
            "vocab_specialisation_above_floor": {0: 0.2, 1: 0.3},
            "token_expert_mi_share_of_max": {0: 0.10, 1: 0.12},
            "utilisation_p5": {0: 0.2, 1: 0.4},
            "utilisation_p95": {0: 2.0, 1: 2.2},
        },
        "lossfree": {
            "coactivation_max": {0: 0.20, 1: 0.22},
            "vocab_specialisation_above_floor": {0: 0.5, 1: 0.7},
            "token_expert_mi_share_of_max": {0: 0.30, 1: 0.34},
            "utilisation_p5": {0: 0.8, 1: 0.9},
            "utilisation_p95": {0: 1.2, 1: 1.3},
        },
        "old": {"ppl": {0: 45.0}},  # evaluated before the metrics existed
    }
    items = findings.specialisation_items(summary_of(values), "test")
    text = ["".join(piece for piece, _ in item) for item in items]
    assert len(text) == 4
    assert text[0].startswith("Co-activation: ") and "highest for topk (0.3500 [" in text[0]
    assert "lowest for lossfree (0.2100 [" in text[0]
    assert "highest for lossfree (0.6000 [" in text[1] and "lowest for topk (0.2500 [" in text[1]
    assert "maximum is highest for lossfree (0.3200 [" in text[1]
    assert "widest for topk (0.3000 to 2.100)" in text[2] and "narrowest for lossfree (0.8500 to 1.250)" in text[2]
    assert text[3] == "No value for dense, old: no routing, or runs evaluated before these metrics existed."
    assert findings.specialisation_items(summary_of({"dense": {"ppl": {0: 50.0}}}), "test") == [
        [
            (
                "No variant has these values: none routes, or its runs were evaluated before these metrics existed.",
                "muted",
            )
        ]
    ]


@pytest.fixture()
def study(tmp_path) -> Path:
    """A study record with its runs: rdesi's evaluated before these metrics (no keys), a tokenizer."""
    from gtmoe.data import train_tokenizer

    root = tmp_path / "results" / "test"
    variants = ["dense", "topk", "rdesi"]
    for variant in variants:
        for seed in (0, 1):
            write_run(root / "runs", variant, seed, specialisation=variant != "rdesi")
    record = write_study_record(root, variants, (0, 1))
    write_baselines(root / "baselines" / "ngram.json")
    train_tokenizer([f"word{i} and more words\n" for i in range(40)], 300, root / "data" / "tokenizer.json")
    return record


def test_the_step_end_to_end_treats_older_evaluations_as_missing(study):
    root = study.parent
    for verb in ("aggregate", "stats", "specialisation", "findings"):
        assert main([verb, "--study", str(study)]) == 0, verb
    summary_name, vocabulary_name, agreement_name = outputs.SPECIALISATION
    for name in outputs.SPECIALISATION:
        assert all((root / "summary" / f"{name}.{suffix}").is_file() for suffix in ("parquet", "csv", "html"))
    for name in (outputs.COACTIVATION_FIGURE, outputs.STABILITY_FIGURE, outputs.AGREEMENT_FIGURE):
        assert is_png(root / "figures" / f"{name}.png"), name
    # Agreement across seeds: topk's seeds route the probe alike up to their labels (helpers.probe_sets), rdesi's
    # evaluations predate the probe; dense has no routing.
    agreement = pd.read_parquet(root / "summary" / f"{agreement_name}.parquet").set_index("variant")
    assert list(agreement.index) == ["topk"]
    assert agreement.loc["topk", ["n_seeds", "n_pairs", "n_layers"]].tolist() == [2, 1, 2]
    assert agreement.loc["topk", "agreement_mean"] == pytest.approx(1.0)
    assert agreement.loc["topk", "chance_mean"] < 0.9
    assert agreement.loc["topk", "tokens"] == PROBE_VALID.sum()
    status = pd.read_parquet(root / "summary" / "run_status.parquet")
    assert (status["status"] == "ok").all()  # an older evaluation is not a failed run
    table = pd.read_parquet(root / "summary" / f"{summary_name}.parquet")
    test = table[table["split"] == "test"].set_index(["variant", "metric"])
    for metric in (*SPECIALISATION_METRICS, *UTILISATION_METRICS, *STABILITY_METRICS):
        assert test.loc[("rdesi", metric), "n"] == 0 and test.loc[("dense", metric), "n"] == 0
        assert test.loc[("topk", metric), "n"] == 2 and math.isfinite(test.loc[("topk", metric), "mean"])
    vocabulary = pd.read_parquet(root / "summary" / f"{vocabulary_name}.parquet")
    assert set(vocabulary["variant"]) == {"topk"} and (vocabulary["seed"] == 0).all()
    # decoded with the study's tokenizer: the busiest expert's most routed id first
    evaluation = json.loads((root / "runs" / "topk" / "seed0" / "eval_test.json").read_text())
    layer = evaluation["per_layer"][-1]
    busiest = int(np.argmax(layer["load"]))
    decode = collect.read_tokenizer(root / "data" / "tokenizer.json")
    first = vocabulary.iloc[0]
    assert first["expert"] == busiest
    assert first["tokens"].startswith(
        f"{decode(layer['top_tokens'][busiest][0])} ({layer['top_token_counts'][busiest][0]})"
    )
    page = (root / "summary" / outputs.FINDINGS).read_text()
    assert "What the experts learned (exploratory)" in page and "No value for dense, rdesi" in page
    assert "Agreement across seeds: </b>the matched agreement of two seeds&#39; routings of the probe" in page
    assert "is 1.000, range 1.000–1.000 over 1 pair, chance" in page and "for topk" in page
    assert "Routing stability over training (StableMoE): </b>the mean share of probe tokens" in page


def test_a_study_that_does_not_score_validation_reads_no_probe(study):
    """The confirmation preset scores test only (eval_splits): a validation file left in a run directory by an
    earlier evaluation is not this study's output, so agreement across seeds reads none."""
    record = json.loads(study.read_text())
    record["eval_splits"] = ["test"]
    study.write_text(json.dumps(record))
    for verb in ("aggregate", "stats", "specialisation"):
        assert main([verb, "--study", str(study)]) == 0, verb
    assert (study.parent / "runs" / "topk" / "seed0" / "eval_validation.json").is_file()
    agreement = pd.read_parquet(study.parent / "summary" / f"{outputs.SPECIALISATION[2]}.parquet")
    assert agreement.empty
