"""What the experts learned (issue 23), from the per-layer arrays of the evaluation JSONs (collect.load_layer_arrays)
and the per-variant summary the `stats` step wrote; nothing here knows a router.

* Co-activation (OLMoE, Muennighoff et al. 2024): ``share[i, j] = C[i, j] / C[i, i]``, the share of the tokens routed
  to expert i that were also routed to expert j (gtmoe.metrics.coactivation_shares). Expert indices are arbitrary
  labels that differ between seeds and layers, so each run's and layer's experts are first ranked by their tokens
  (C[i, i]; rank 1 = busiest) and the matrices averaged by rank over seeds and layers (``coactivation_by_rank``).
* Vocabulary: per expert of one run and layer, its share of the layer's assignments, the share of its tokens that
  come from its top token ids, and those ids (``vocabulary_table``).
* The per-variant scalars (gtmoe.contract.SPECIALISATION_METRICS, UTILISATION_METRICS, STABILITY_METRICS) are rows
  of the summary, labelled exploratory unless declared primary (``specialisation_summary``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from analysis.collect import variant_order
from analysis.stats import EXPLORATORY, PRIMARY, VARIANT
from gtmoe import metrics
from gtmoe.contract import SPECIALISATION_METRICS, STABILITY_METRICS, UTILISATION_METRICS

METRICS = (*SPECIALISATION_METRICS, *UTILISATION_METRICS, *STABILITY_METRICS)
COACTIVATION_COLUMNS = ["variant", "rank", "partner_rank", "share", "n_matrices"]
PANEL_COLUMNS = ["variant", "n_experts", "n_seeds", "n_layers", "n_matrices", "partners_per_token", "independent"]
VOCABULARY_COLUMNS = ["variant", "seed", "layer", "expert", "load_share", "top_token_share", "tokens"]


def coactivation_by_rank(arrays: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The co-activation shares of each variant, averaged over its seeds and MoE layers with experts ranked by
    their tokens in each run and layer (the arrays of ``collect.load_layer_arrays``; rows without a matrix skipped).

    Returns ``(shares, panels)``: ``shares`` one row per (variant, rank, partner_rank) with the mean ``share`` over
    the ``n_matrices`` (run, layer) matrices that define it (the diagonal left out); ``panels`` one row per variant:
    its number of experts, seeds, layers and matrices, ``partners_per_token`` (the mean row sum, k − 1 for a top-k
    router without drops) and ``independent``, the share every cell would have if each token's other experts were
    drawn independently of its first (``partners_per_token / (E − 1)``). A variant whose runs differ in E keeps
    its most common E. Variants in study order.
    """
    present = arrays[arrays["coactivation"].map(lambda matrix: matrix is not None)]
    shares, panels = [], []
    for variant in [v for v in variant_order(arrays) if v in set(present["variant"].astype(str))]:
        part = present[present["variant"].astype(str) == variant]
        sizes = part["coactivation"].map(len)
        part = part[sizes == sizes.mode().max()]
        ranked = []
        for matrix in part["coactivation"]:
            counts = np.asarray(matrix, dtype=np.float64)
            order = np.argsort(-np.diag(counts), kind="stable")  # rank 1 = the expert with the most tokens
            ranked.append(metrics.coactivation_shares(counts[np.ix_(order, order)]))
        stack = np.stack(ranked)
        defined = np.isfinite(stack).sum(axis=0)
        with np.errstate(invalid="ignore"):  # a cell no matrix defines (the diagonal) is NaN
            mean = np.nansum(stack, axis=0) / defined
        row_sums = np.nansum(stack, axis=2)[np.isfinite(stack).any(axis=2)]  # the rows of experts with tokens
        n_experts = stack.shape[1]
        for rank, partner in np.ndindex(n_experts, n_experts):
            shares.append(
                dict(
                    variant=variant,
                    rank=rank + 1,
                    partner_rank=partner + 1,
                    share=float(mean[rank, partner]),
                    n_matrices=int(defined[rank, partner]),
                )
            )
        partners = float(row_sums.mean()) if row_sums.size else math.nan
        panels.append(
            dict(
                variant=variant,
                n_experts=n_experts,
                n_seeds=int(part["seed"].nunique()),
                n_layers=int(part["layer"].nunique()),
                n_matrices=len(part),
                partners_per_token=partners,
                independent=partners / (n_experts - 1) if n_experts > 1 else math.nan,
            )
        )
    return pd.DataFrame(shares, columns=COACTIVATION_COLUMNS), pd.DataFrame(panels, columns=PANEL_COLUMNS)


def vocabulary_table(arrays: pd.DataFrame, decode: Callable[[int], str] | None) -> pd.DataFrame:
    """Per variant, its lowest seed and last MoE layer that have top token ids: one row per expert (busiest first)
    with its share of the layer's assignments, the share of its tokens from its top token ids, and those ids as
    text (``decode``: collect.read_tokenizer; ``#id`` without a tokenizer) with their counts, ids never routed to
    the expert left out. Variants in study order; a variant without such a layer has no row."""
    present = arrays[arrays["top_tokens"].map(lambda ids: ids is not None)]
    rows = []
    for variant in [v for v in variant_order(arrays) if v in set(present["variant"].astype(str))]:
        part = present[present["variant"].astype(str) == variant]
        part = part[part["seed"] == part["seed"].min()]
        entry = part.loc[part["layer"].idxmax()]
        load = np.asarray(entry["load"], dtype=np.float64)
        total = load.sum()
        for expert in np.argsort(-load, kind="stable"):
            counts = np.asarray(entry["top_token_counts"][expert], dtype=np.float64)
            ids = entry["top_tokens"][expert]
            tokens = [
                (decode(token) if decode else f"#{token}", int(count)) for token, count in zip(ids, counts) if count > 0
            ]
            rows.append(
                dict(
                    variant=variant,
                    seed=int(entry["seed"]),
                    layer=int(entry["layer"]),
                    expert=int(expert),
                    load_share=load[expert] / total if total else math.nan,
                    top_token_share=counts.sum() / load[expert] if load[expert] else math.nan,
                    tokens=" · ".join(f"{text} ({count})" for text, count in tokens),
                )
            )
    return pd.DataFrame(rows, columns=VOCABULARY_COLUMNS)


def specialisation_summary(summary: pd.DataFrame, primary: Iterable[str]) -> pd.DataFrame:
    """The variants' rows of the summary (``stats.summarize``, as the `stats` step wrote it) for the specialisation
    metrics, in the summary's order, with ``label``: exploratory, or primary for a metric declared in
    ``statistics.primary``. No statistic is recomputed."""
    primary = set(primary)
    rows = summary[(summary["kind"] == VARIANT) & summary["metric"].isin(METRICS)]
    return rows.assign(label=[PRIMARY if m in primary else EXPLORATORY for m in rows["metric"]]).reset_index(drop=True)
