"""Test helpers: the one way tests run a command line; the workflow's shared constants and builders
(a checkout copy, a --configfile, the config merged and checked as the Snakefile does); synthetic run
directories following the run-directory contract (gtmoe.contract) and tidy tables for the analysis tests.
Imported by the tests, which never import each other; fixtures live in conftest.py.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from gtmoe.contract import PROBE_SPLIT, SPECIALISATION_METRICS, STABILITY_METRICS, UTILISATION_METRICS
from gtmoe.metrics import gini
from gtmoe.metrics import max_violation as maxvio
from gtmoe.probe import pack_expert_sets

REPO = Path(__file__).resolve().parents[1]


def run_module(
    module: str, *args: str, cwd: Path | str = REPO, env: dict | None = None, timeout: float = 600, check: bool = False
) -> subprocess.CompletedProcess:
    """`python -m module args...` as a user runs it: this checkout importable (also from another working
    directory), output captured as text. Snakemake runs forked from a process that has imported it already
    (tests/snakemake_server.py), everything else in a fresh interpreter."""
    command = [sys.executable, "-m", module, *map(str, args)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if module == "snakemake" and os.environ.get(FRESH_SNAKEMAKE) != "1":
        done = _SNAKEMAKE_SERVER.run(command, Path(cwd), environment, timeout)
    else:
        done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    if check:
        done.check_returncode()
    return done


FRESH_SNAKEMAKE = "GTMOE_TESTS_FRESH_SNAKEMAKE"  # =1: every Snakemake command in a fresh interpreter


class SnakemakeServer:
    """This process's fork server for Snakemake commands (tests/snakemake_server.py), started on first use and
    again if it died; it ends when this process closes its input."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.pending = b""  # the server's replies read but not yet taken
        self.outputs = Path(tempfile.mkdtemp(prefix="snakemake-server-"))
        atexit.register(shutil.rmtree, self.outputs, ignore_errors=True)

    def _server(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("snakemake_server.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                text=True,
            )
            self.pending = b""
        return self.process

    def _reply(self, server: subprocess.Popen, deadline: float | None) -> dict | None:
        """The server's next reply, or None once `deadline` (time.monotonic) has passed. Read unbuffered from the
        pipe into this object's own buffer: both replies may arrive at once, and select sees only the pipe."""
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([server.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(server.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the Snakemake fork server died (exit {server.wait()})")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def run(self, command: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        server = self._server()
        out, err = self.outputs / "stdout", self.outputs / "stderr"
        out.unlink(missing_ok=True)  # never the previous command's
        err.unlink(missing_ok=True)
        request = {"args": command[3:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        pid = self._reply(server, None)["pid"]
        reply = self._reply(server, time.monotonic() + timeout)
        if reply is None:  # as subprocess.run does: kill the command, then raise
            os.kill(pid, signal.SIGKILL)
            self._reply(server, None)
            raise subprocess.TimeoutExpired(command, timeout, *self._outputs())
        return subprocess.CompletedProcess(command, reply["returncode"], *self._outputs())

    def _outputs(self) -> tuple[str, str]:
        """The last command's stdout and stderr, as text ("" for a stream it never opened)."""
        paths = (self.outputs / name for name in ("stdout", "stderr"))
        return tuple(p.read_text(errors="replace") if p.exists() else "" for p in paths)


_SNAKEMAKE_SERVER = SnakemakeServer()


# --------------------------------------------------------------------------- the workflow

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
SMOKE = "workflow/presets/smoke.yaml"
RUN_FILES = (
    "checkpoint.pt",
    "config.yaml",
    "train_log.parquet",
    "router_log.parquet",
    "train_summary.json",
    "eval_validation.json",
    "eval_test.json",
)
SUMMARY_FILES = (
    "runs.parquet",
    "run_status.csv",
    "run_status.html",
    "summary.csv",
    "summary.html",
    "comparisons.csv",
    "comparisons.html",
    "ablations.csv",
    "ablations.html",
    "findings.html",
    "compute.csv",
    "compute.html",
    "specialisation.csv",
    "specialisation.html",
    "vocabulary.csv",
    "vocabulary.html",
    "seed_agreement.csv",
    "seed_agreement.html",
    "sensitivity.csv",
    "sensitivity.html",
    "sensitivity_best.csv",
    "sensitivity_best.html",
)
ALIAS_BOMB = "colour:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)  # 9**9 strings from 0.4 kB


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_module("snakemake", *args, cwd=cwd, timeout=timeout)


def copy_checkout(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) with the corpus path made absolute."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    config = yaml.safe_load((dest / "config.yaml").read_text())
    config["data"]["local_dir"] = str(WIKITEXT)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


# The data stage of the finished smoke study (corpus, tokenizer, shards, n-gram baselines) with its jobs'
# benchmark files: a test that runs a smoke study of its own from a copy of these starts at its training jobs.
SMOKE_DATA_STAGE = (
    "data",
    "baselines",
    "benchmarks/corpus.tsv",
    "benchmarks/tokenizer.tsv",
    "benchmarks/shards",
    "benchmarks/ngram_baselines.tsv",
)


def copy_data_stage(finished: Path, study: Path) -> None:
    """The finished smoke study's data stage (SMOKE_DATA_STAGE) into the checkout `study`, mtimes kept: Snakemake
    finds it up to date for any smoke study that changes no data setting."""
    for part in SMOKE_DATA_STAGE:
        source, dest = finished / "results" / "smoke" / part, study / "results" / "smoke" / part
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, dest)


# Another study's outputs (the default study's, and the layout before studies had their own roots), planted in
# the finished smoke study's checkout before it runs: nothing of the smoke study may read them.
DECOYS = (
    "results/default/summary/sensitivity.csv",
    "results/default/summary/sensitivity_best.csv",
    "results/default/benchmarks/train/topk/seed0.tsv",
    "results/summary/sensitivity.csv",
    "results/figures/perplexity.png",
)


def run_smoke_study(root: Path) -> Path:
    """The smoke preset run to the end (`snakemake --cores 2`) in a copy of the checkout at root/study, with the
    DECOYS planted and its temporary directory at root/tmp (what a run leaves outside its checkout shows
    there). Returns the study's checkout."""
    study = copy_checkout(root / "study")
    for decoy in DECOYS:
        (study / decoy).parent.mkdir(parents=True, exist_ok=True)
        (study / decoy).write_text("DECOY\n")
    (root / "tmp").mkdir()
    done = run_module(
        "snakemake", "--cores", "2", "--configfile", SMOKE, cwd=study, env={"TMPDIR": str(root / "tmp")}, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return study


def copy_study(study: Path, root: Path) -> Path:
    """A copy of a finished study's checkout at root/study (mtimes and Snakemake's records kept), its
    temporary directory copied to root/tmp; returns the copy's checkout."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(study, root / "study", symlinks=True)
    shutil.copytree(study.parent / "tmp", root / "tmp", symlinks=True)
    return root / "study"


def write_override(tmp_path: Path, override: dict | str) -> str:
    """A --configfile: `override` dumped as YAML, or written as is when it is YAML text."""
    path = tmp_path / "override.yaml"
    path.write_text(override if isinstance(override, str) else yaml.safe_dump(override))
    return str(path)


def merged_config(override: dict | str) -> dict:
    """config.yaml with `override` merged as Snakemake merges a --configfile (mappings recursively); YAML text
    is first read strictly, as workflow/rules/common.smk rereads every config file."""
    from snakemake.utils import update_config

    from gtmoe.config import load_yaml

    if isinstance(override, str):
        override = load_yaml(override, "override.yaml")
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


# --------------------------------------------------------------------------- synthetic run directories

VARIANTS = ("dense", "topk", "switch", "rdesi", "rdesi_no_reputation", "rdesi_no_load", "rdesi_no_bonus")
ROUTERS = {"rdesi_no_reputation": "rdesi", "rdesi_no_load": "rdesi", "rdesi_no_bonus": "rdesi"}


def make_evaluation(
    variant: str,
    seed: int,
    split: str,
    *,
    n_layers: int = 2,
    n_experts: int = 4,
    top_k: int = 2,
    ppl: float | None = None,
    status: str = "ok",
    rng: np.random.Generator | None = None,
    specialisation: bool = True,
) -> dict:
    """An ``eval_{split}.json`` payload with consistent per-layer loads and metrics; with ``specialisation`` (off:
    an evaluation written before issue 23) also what the experts learned (``specialisation_entries``)."""
    rng = rng or np.random.default_rng(seed)
    dense = variant == "dense"
    ppl = float(ppl if ppl is not None else 100 + 10 * rng.random())
    tokens, words = 10_000, 8_000
    nll = math.log(ppl)
    per_layer = []
    for layer in range(0 if dense else n_layers):
        counts = rng.integers(1_000, 6_000, size=n_experts)
        f = counts / counts.sum()
        per_layer.append(
            dict(
                layer=layer,
                load=[int(c) for c in counts],
                gini=float(gini(counts)),
                load_entropy=float(-(f * np.log(f)).sum() / math.log(n_experts)),
                cv=float(counts.std() / counts.mean()),
                maxvio_global=float(maxvio(counts)),
                maxvio_batch=float(maxvio(counts) * 1.2),
                dead_experts=0,
                drop_rate=0.0,
                token_expert_mi=float(rng.random() * 0.3),
            )
        )
        if specialisation:
            per_layer[-1].update(
                specialisation_entries(counts, top_k, np.random.default_rng([seed, layer, len(variant)]))
            )
            if split == PROBE_SPLIT:
                per_layer[-1]["probe_sets"] = probe_sets(variant, seed, layer, n_experts, top_k)
            per_layer[-1].update(snapshot_curves(np.random.default_rng([seed, layer, len(variant), 7])))

    def layer_mean(key: str) -> float | None:
        return None if dense else float(np.mean([entry[key] for entry in per_layer]))

    learned = (
        {key: layer_mean(key) for key in (*SPECIALISATION_METRICS, *UTILISATION_METRICS, *STABILITY_METRICS)}
        if specialisation
        else {}
    )

    return dict(
        variant=variant,
        seed=seed,
        split=split,
        router=ROUTERS.get(variant, variant),
        status=status,
        ppl=ppl,
        word_ppl=math.exp(nll * tokens / words),
        nll=nll,
        tokens=tokens,
        words=words,
        gini=layer_mean("gini"),
        load_entropy=layer_mean("load_entropy"),
        cv=layer_mean("cv"),
        maxvio_global=layer_mean("maxvio_global"),
        maxvio_batch=layer_mean("maxvio_batch"),
        dead_experts=layer_mean("dead_experts"),
        drop_rate=layer_mean("drop_rate"),
        token_expert_mi=layer_mean("token_expert_mi"),
        router_saturation=None,
        probe=PROBE_RECORD if specialisation and split == PROBE_SPLIT and not dense else None,
        **learned,
        n_params=1_000_000,
        n_active_params=600_000,
        tokens_per_s=5_000.0 + rng.random(),
        wall_s=12.5,
        peak_mem_mb=512.0,
        n_experts=None if dense else n_experts,
        top_k=None if dense else top_k,
        train_step=200,
        per_layer=per_layer,
    )


def specialisation_entries(load: np.ndarray, top_k: int, rng: np.random.Generator, vocab: int = 30) -> dict:
    """A layer's co-activation counts (symmetric, each expert's tokens on the diagonal, a pair at most the fewer of
    the two's tokens), top token ids drawn from its load, and the scalars (those of the arrays from gtmoe.metrics)."""
    from gtmoe import metrics

    n_experts = len(load)
    pairs = rng.random((n_experts, n_experts))
    pairs = np.triu(pairs, 1) + np.triu(pairs, 1).T
    cocounts = np.floor(pairs * np.minimum.outer(load, load) / n_experts).astype(int)
    np.fill_diagonal(cocounts, load)
    top_ids, top_counts = [], []
    for tokens in load:
        counts = rng.multinomial(int(tokens), rng.dirichlet(np.full(vocab, 0.3)))
        order = np.lexsort((np.arange(vocab), -counts))[:10]
        top_ids.append([int(i) for i in order])
        top_counts.append([int(counts[i]) for i in order])
    utilisation = np.sort(rng.gamma(8.0, 1 / 8.0, size=5))
    floor = top_k / n_experts
    return dict(
        coactivation=cocounts.tolist(),
        top_tokens=top_ids,
        top_token_counts=top_counts,
        **metrics.coactivation_summary(cocounts),
        vocab_specialisation=float(floor + (1 - floor) * rng.random() * 0.5),
        vocab_specialisation_above_floor=float(rng.random() * 0.5),
        top_token_share=float(np.mean([sum(c) / t for c, t in zip(top_counts, load)])),
        token_expert_mi_share_of_max=float(rng.random() * 0.4),
        **{name: float(value) for name, value in zip(UTILISATION_METRICS, utilisation)},
    )


PROBE_TOKENS, PROBE_TYPES = 96, 12  # the synthetic probe: 96 tokens of 12 types, the last 6 padding
PROBE_VALID = np.arange(PROBE_TOKENS) < PROBE_TOKENS - 6
PROBE_RECORD = {
    "blocks": 3,
    "tokens": PROBE_TOKENS,
    "blocks_sha256": "0" * 64,
    "valid": pack_expert_sets(PROBE_VALID[:, None]),
}
DATA_DRIVEN_PROBE = "topk"  # its seeds route the probe alike up to their expert labels: agreement 1


def probe_sets(variant: str, seed: int, layer: int, n_experts: int, top_k: int) -> str:
    """A layer's packed probe routing: each token type's k experts, fixed per layer and relabelled by a per-seed
    permutation for DATA_DRIVEN_PROBE (its seeds agree exactly), drawn per seed for every other variant."""
    types = np.arange(PROBE_TOKENS) % PROBE_TYPES
    data_driven = variant == DATA_DRIVEN_PROBE
    rng = np.random.default_rng([layer] if data_driven else [seed, layer, len(variant)])
    experts = np.stack([rng.choice(n_experts, size=top_k, replace=False) for _ in range(PROBE_TYPES)])
    if data_driven:
        experts = np.random.default_rng([seed, layer]).permutation(n_experts)[experts]
    sets = np.zeros((PROBE_TOKENS, n_experts), dtype=bool)
    sets[np.arange(PROBE_TOKENS)[:, None], experts[types]] = True
    return pack_expert_sets(sets)


def snapshot_curves(rng: np.random.Generator, steps: Sequence[int] = (0, 50, 100, 150, 200)) -> dict:
    """A layer's routing-snapshot curves: fluctuation falling over training, the settled share rising to 1."""
    fluctuation = np.sort(rng.random(len(steps) - 1))[::-1] * 0.6
    settled = np.append(np.sort(rng.random(len(steps) - 1)), 1.0)
    return dict(
        snapshot_steps=list(steps),
        fluctuation_curve=fluctuation.tolist(),
        settled_curve=settled.tolist(),
        routing_fluctuation=float(fluctuation.mean()),
        routing_fluctuation_last=float(fluctuation[-1]),
        last_fluctuation_median=float(rng.random() * 0.5),
        late_fluctuation_share=float(rng.random() * 0.6),
    )


def make_train_log(seed: int, steps: Sequence[int] = (0, 50, 100, 150, 200)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    steps = np.asarray(steps)
    return pd.DataFrame(
        dict(
            step=steps,
            loss=6.0 - steps / 100 + 0.05 * rng.random(len(steps)),
            lr=np.full(len(steps), 1e-3),
            aux_loss=np.full(len(steps), 0.01),
            z_loss=np.full(len(steps), 0.001),
            grad_norm=1 + rng.random(len(steps)),
            tokens_per_s=4_000 + 100 * rng.random(len(steps)),
            elapsed_s=steps * 0.1 + 1.0,
        )
    )


def make_router_log(
    variant: str, seed: int, *, n_layers: int = 2, n_experts: int = 4, steps: Sequence[int] = (0, 50, 100, 150, 200)
) -> pd.DataFrame:
    """Long router log; RD-ESI variants carry reputation/load_hat/bonus, others NaN."""
    rng = np.random.default_rng(1000 + seed)
    rows = []
    rdesi = ROUTERS.get(variant, variant) == "rdesi"
    for step in steps:
        for layer in range(n_layers):
            load = rng.dirichlet(np.full(n_experts, 2.0 + step / 50))
            for expert in range(n_experts):
                rows.append(
                    dict(
                        step=step,
                        layer=layer,
                        expert=expert,
                        load=load[expert],
                        reputation=rng.normal() * 0.1 if rdesi else math.nan,
                        load_hat=n_experts * load[expert] - 1 if rdesi else math.nan,
                        bonus=(0.0 if variant == "rdesi_no_bonus" else 0.1 * math.sqrt(math.log(step + 2) / (step + 1)))
                        if rdesi
                        else math.nan,
                        bias=math.nan,
                    )
                )
    return pd.DataFrame(rows)


def write_run(
    root: Path,
    variant: str,
    seed: int,
    *,
    splits: Sequence[str] = ("validation", "test"),
    train_log: bool = True,
    router_log: bool = True,
    **evaluation,
) -> Path:
    """Write one run directory ``root/{variant}/seed{seed}`` and return it."""
    run_dir = Path(root) / variant / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, len(variant)])
    for split in splits:
        payload = make_evaluation(variant, seed, split, rng=rng, **evaluation)
        (run_dir / f"eval_{split}.json").write_text(json.dumps(payload))
    if train_log:
        make_train_log(seed).to_parquet(run_dir / "train_log.parquet", index=False)
    if router_log and variant != "dense":
        make_router_log(variant, seed).to_parquet(run_dir / "router_log.parquet", index=False)
    return run_dir


def write_study(root: Path, variants: Sequence[str] = VARIANTS, seeds: Sequence[int] = (0, 1, 2)) -> list[Path]:
    """Every variant x seed, all complete and ok."""
    return [write_run(root, v, s) for v in variants for s in seeds]


# --------------------------------------------------------------------------- synthetic tidy tables


def point(
    sweep="s", option="beta", value=0.3, variant="rdesi", term="reputation", fixed="", base="rdesi", router="rdesi"
) -> dict:
    """One sweep-design record, as the sensitivity analysis reads it."""
    return dict(
        sweep=sweep, base=base, router=router, option=option, value=value, variant=variant, term=term, fixed=fixed
    )


def tidy_table(values: dict[str, dict[str, dict[int, float]]], split: str = "test") -> pd.DataFrame:
    """Tidy rows from {variant: {metric: {seed: value}}}, model level, all ok."""
    rows = [
        dict(
            variant=variant,
            seed=seed,
            split=split,
            metric=metric,
            layer="all",
            value=value,
            source="synthetic",
            run_status="ok",
        )
        for variant, metrics in values.items()
        for metric, by_seed in metrics.items()
        for seed, value in by_seed.items()
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- study records


# The ablations' options: each removes one RD-ESI term (as config.yaml declares them).
ABLATION_OPTIONS = {"rdesi_no_reputation": {"beta": 0.0}, "rdesi_no_load": {"gamma": 0.0}, "rdesi_no_bonus": {"c": 0.0}}


def study_record(
    root: Path | str, variants: Sequence[str] = VARIANTS, seeds: Sequence[int] = (0, 1, 2), **fields
) -> dict:
    """A study record (study.json, as gtmoe.study writes it) of `variants` under `root`: each variant's router
    (ROUTERS, else its own name) with its options resolved by the router's Config (ABLATION_OPTIONS for the
    ablations), the routers as they describe themselves, the default statistics and findings settings,
    topk as the reference, the rdesi ablations that are among `variants`, no sweeps. `fields` replace
    top-level keys."""
    import dataclasses

    from gtmoe import routers
    from gtmoe.config import RouterConfig
    from gtmoe.contract import STUDY_RECORD_FORMAT
    from gtmoe.study import FINDINGS_DEFAULTS, STATISTICS_DEFAULTS

    entries = {}
    for variant in variants:
        router = ROUTERS.get(variant, variant)
        options = RouterConfig(router, dict(ABLATION_OPTIONS.get(variant, {}))).for_horizon(200).resolve()
        entries[variant] = {"router": router, "options": dataclasses.asdict(options)}
    record = {
        "format": STUDY_RECORD_FORMAT,
        "name": "test",
        "root": str(root),
        "seeds": list(seeds),
        "reference": "topk" if "topk" in variants else variants[0],
        "ablation": {
            "base": "rdesi" if "rdesi" in variants else None,
            "variants": [v for v in ABLATION_OPTIONS if v in variants and "rdesi" in variants],
        },
        "statistics": {**STATISTICS_DEFAULTS, "primary": list(STATISTICS_DEFAULTS["primary"])},
        "findings": dict(FINDINGS_DEFAULTS),
        "routers": {r["router"]: routers.describe(r["router"]) for r in entries.values()},
        "variants": entries,
        "sweeps": [],
        "run": {},
    }
    record.update(fields)
    return record


def write_study_record(
    root: Path, variants: Sequence[str] = VARIANTS, seeds: Sequence[int] = (0, 1, 2), **fields
) -> Path:
    """`study_record` written as `root`/study.json (its root: `root`); returns the file."""
    path = Path(root) / "study.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(study_record(root, variants, seeds, **fields), indent=2, ensure_ascii=False))
    return path


def single_error_line(stderr: str) -> str:
    """A CLI's failure report: exactly one `error: ...` line and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


# An n-gram baseline file (`python -m gtmoe baselines`): the bigram within the synthetic PPL range (100-110),
# the unigram far above.
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


def write_baselines(path: Path) -> Path:
    """NGRAM written as an n-gram baseline file at `path`; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": NGRAM, "vocab_size": 4096, "shards": "results/test/data/shards"}))
    return path


def write_run_configs(study: Path, override: dict | str) -> list[Path]:
    """Every run directory's `config.yaml` in the checkout copy `study`, written as `gtmoe train` writes it, for
    config.yaml with `override` merged (as `merged_config`): placeholders of a study that was not trained must
    still be the runs the study asks for, which the workflow checks when it parses."""
    from gtmoe.config import save_run_config
    from gtmoe.study import Study

    resolved = Study.from_config(merged_config(override))
    written = []
    for variant in resolved.variant_names:
        for seed in resolved.seeds:
            path = Path(study) / resolved.layout.run_dir(variant, seed) / "config.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_run_config(resolved.run_config(variant, seed), path)
            written.append(path)
    return written


@contextlib.contextmanager
def default_dtype(dtype):
    """Build modules in `dtype` (modules cannot be cast with .to() once their parameters are fake tensors)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
