"""The load-over-training figure: its two views checked against a brute-force computation, and the figure."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

from analysis import collect
from analysis.figures import load_over_training as figure

from helpers import make_router_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VARIANTS = ["dense", "topk", "lossfree"]  # study order; dense has no router, so no router-log rows
SEEDS = {"topk": (2, 1, 3), "lossfree": (4, 5, 6)}  # unordered, and not starting at 0: the lowest seed counts
N_EXPERTS = 4


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 2_000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def router_log() -> pd.DataFrame:
    """Two routed variants × three seeds, two layers, four experts; lossfree first in the rows (study order must
    come from the categories) and its seed 6 without the last step (fewer seeds at that step)."""
    frames = []
    for variant in ("lossfree", "topk"):
        for seed in SEEDS[variant]:
            log = make_router_log(variant, seed + 10 * len(variant), n_experts=N_EXPERTS)
            if (variant, seed) == ("lossfree", 6):
                log = log[log["step"] < log["step"].max()]
            frames.append(log.assign(variant=variant, seed=seed))
    log = pd.concat(frames, ignore_index=True)
    return log.assign(variant=pd.Categorical(log["variant"], categories=VARIANTS, ordered=True))


def brute_force(router_log: pd.DataFrame) -> tuple[dict, dict]:
    """(seed view, sorted mean view) by loops: {(variant, step, layer, expert): E · f} of each variant's lowest
    seed, and {(variant, layer, step, rank): (mean over seeds of the rank-th largest E · f, seeds)}."""
    batches: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in router_log.itertuples():
        batches[(str(row.variant), row.seed, row.step, row.layer)][row.expert] = row.load
    lowest: dict[str, int] = {}
    for variant, seed, _, _ in batches:
        lowest[variant] = min(seed, lowest.get(variant, seed))
    seed_view, by_rank = {}, defaultdict(list)
    for (variant, seed, step, layer), shares in batches.items():
        total = sum(shares.values())
        relative = {expert: len(shares) * share / total for expert, share in shares.items()}
        if seed == lowest[variant]:
            for expert, value in relative.items():
                seed_view[(variant, step, layer, expert)] = value
        for rank, value in enumerate(sorted(relative.values(), reverse=True), start=1):
            by_rank[(variant, layer, step, rank)].append(value)
    return seed_view, {key: (sum(values) / len(values), len(values)) for key, values in by_rank.items()}


def test_relative_loads_sum_to_the_number_of_experts(router_log):
    per_seed, sorted_mean = figure.load_over_training(router_log)
    for frame, keys in ((per_seed, ["variant", "seed", "step", "layer"]), (sorted_mean, ["variant", "step", "layer"])):
        sums = frame.groupby(keys, observed=True)["relative_load"].sum()
        assert len(sums) > 0 and sums.to_numpy() == pytest.approx(N_EXPERTS)


def test_the_seed_view_is_the_lowest_seed_as_logged(router_log):
    per_seed, _ = figure.load_over_training(router_log)
    expected, _ = brute_force(router_log)
    assert dict(zip(per_seed["variant"].astype(str), per_seed["seed"])) == {"topk": 1, "lossfree": 4}
    got = {(str(r.variant), r.step, r.layer, r.expert): r.relative_load for r in per_seed.itertuples()}
    assert len(got) == len(per_seed) and got.keys() == expected.keys()
    assert [got[k] for k in expected] == pytest.approx(list(expected.values()))


def test_the_sorted_view_averages_each_rank_over_seeds(router_log):
    _, sorted_mean = figure.load_over_training(router_log)
    _, expected = brute_force(router_log)
    got = {(str(r.variant), r.layer, r.step, r.rank): (r.relative_load, r.n_seeds) for r in sorted_mean.itertuples()}
    assert len(got) == len(sorted_mean) and got.keys() == expected.keys()
    assert [got[k][0] for k in expected] == pytest.approx([mean for mean, _ in expected.values()])
    assert [got[k][1] for k in expected] == [n for _, n in expected.values()]
    # Rank 1 is each run's most loaded expert, averaged over seeds; ranks are in decreasing order of load.
    maxima = (
        router_log.assign(relative_load=N_EXPERTS * router_log["load"])
        .groupby(["variant", "seed", "layer", "step"], observed=True)["relative_load"]
        .max()
        .groupby(["variant", "layer", "step"], observed=True)
        .mean()
    )
    top = sorted_mean[sorted_mean["rank"] == 1].set_index(["variant", "layer", "step"])["relative_load"]
    assert top.sort_index().to_numpy() == pytest.approx(maxima.sort_index().to_numpy())
    ordered = sorted_mean.groupby(["variant", "layer", "step"], observed=True)["relative_load"]
    assert ordered.apply(lambda values: values.is_monotonic_decreasing).all()
    last = sorted_mean[(sorted_mean["variant"] == "lossfree") & (sorted_mean["step"] == router_log["step"].max())]
    assert (last["n_seeds"] == 2).all()  # seed 6 did not log the last step


def test_only_routed_variants_in_study_order(router_log):
    for frame in figure.load_over_training(router_log):
        assert collect.variant_order(frame) == ["topk", "lossfree"]
        assert list(dict.fromkeys(frame["variant"].astype(str))) == ["topk", "lossfree"]


def test_the_figure_is_a_png(router_log, tmp_path):
    path = figure.plot_load_over_training(router_log, tmp_path / "load_over_training.png")
    assert path == tmp_path / "load_over_training.png" and is_png(path)


def test_many_variants_or_layers_are_capped(tmp_path, monkeypatch):
    assert figure._shown_layers(list(range(4)), 3) == [0, 1, 2, 3]
    assert figure._shown_layers(list(range(12)), 3) == [0, 2, 4, 7, 9, 11]  # 6 spread from first to last
    assert figure._shown_layers(list(range(4)), 13) == [0]
    variants = [f"v{i}" for i in range(13)]
    log = pd.concat([make_router_log("topk", i, n_layers=3).assign(variant=v, seed=0) for i, v in enumerate(variants)])
    titles = []
    monkeypatch.setattr(figure.plt.Figure, "suptitle", lambda fig, text, **kw: titles.append(text))
    assert is_png(figure.plot_load_over_training(log, tmp_path / "many.png"))
    assert titles and "first MoE layer only (13 variants)" in titles[0]


def test_no_router_logs_give_the_message_figure(tmp_path, monkeypatch):
    messages = []
    original = figure.message_figure
    monkeypatch.setattr(
        figure, "message_figure", lambda path, title, text: messages.append(text) or original(path, title, text)
    )
    empty = collect.load_router_logs([], variants=VARIANTS)
    path = figure.plot_load_over_training(empty, tmp_path / "empty.png")
    assert is_png(path) and messages == ["no router logs (no routed variant)"]
    per_seed, sorted_mean = figure.load_over_training(empty)
    assert per_seed.empty and sorted_mean.empty
