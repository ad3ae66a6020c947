"""Shared fixtures: tiny configs and synthetic token shards, so engine tests run in seconds."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from filelock import FileLock

from gtmoe.config import DataConfig, EvalConfig, ModelConfig, RouterConfig, RunConfig, TrainConfig
from gtmoe.data import write_shards

from helpers import WIKITEXT, run_smoke_study

TINY_VOCAB = 300
TINY_SEQ = 16

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: each worker's in-process torch on one thread. Two multi-threaded workers would
    # oversubscribe the cores, and torch's CPU kernels stall at their barriers when others hold the cores.
    torch.set_num_threads(1)


def tiny_model(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=TINY_VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=TINY_SEQ,
        n_experts=4,
        top_k=2,
        d_expert=32,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """train/validation/test shard directories of a repetitive synthetic stream (learnable)."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6000), ("validation", 1000), ("test", 1000)):
        pattern = rng.integers(0, TINY_VOCAB, size=50)
        stream = np.concatenate([pattern, rng.integers(0, TINY_VOCAB, size=n)]).astype(np.int32)
        stream[::3] = pattern[np.arange(len(stream[::3])) % 50]  # structure a model can pick up
        write_shards(stream, root / split, TINY_SEQ, n_words=n // 2)
    return root


HEAVY_MARKS = {"slow", "integration", "faults"}


def pytest_collection_modifyitems(config, items):
    """Order the test files for two workers that each take whole files (`--dist loadfile`, in this order): first
    one file that reads the finished smoke study, so a worker builds it at once; then the other files with long
    tests; then the rest of the files that read the study, usually finished by then (so a worker seldom waits on
    its lock); then everything else, whose short files even out the two workers' ends. Within a file the order is
    kept."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    reads_study = [f for f, tests in files.items() if any("finished_smoke" in t.fixturenames for t in tests)]

    def rank(file: str) -> int:
        if reads_study and file == reads_study[0]:
            return 0
        if file in reads_study:
            return 2
        return 1 if any(HEAVY_MARKS & {m.name for m in t.iter_markers()} for t in files[file]) else 3

    items[:] = [t for f in sorted(files, key=rank) for t in files[f]]  # sorted is stable: else as collected


@pytest.fixture(scope="session")
def finished_smoke(tmp_path_factory, worker_id):
    """The smoke study, run once to the end for the whole session (helpers.run_smoke_study), also under
    pytest-xdist: the first worker that needs it builds it under a file lock in the directory every worker's
    temporary root shares (the pattern of pytest-xdist's docs), the others wait and read it. Shared by the modules
    that check a finished study: each reads or changes only its own copy (helpers.copy_study)."""
    if not WIKITEXT.is_dir():
        pytest.skip(f"needs the WikiText-2 files in {WIKITEXT}")
    if worker_id == "master":  # not distributed (-n 0)
        return run_smoke_study(tmp_path_factory.mktemp("finished"))
    shared = tmp_path_factory.getbasetemp().parent
    root, done = shared / "finished_smoke", shared / "finished_smoke.done"
    with FileLock(str(shared / "finished_smoke.lock")):
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed in another worker: build it again
            root.mkdir()
            run_smoke_study(root)
            done.touch()
    return root / "study"


def tiny_run(shards, router: str = "topk", seed: int = 0, **train) -> RunConfig:
    values = dict(
        seed=seed,
        batch_size=4,
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=4,
        log_every=2,
        router_log_every=2,
    )
    values.update(train)
    return (
        RunConfig(
            variant=router,
            model=tiny_model(),
            router=RouterConfig.from_mapping({"name": router}),
            train=TrainConfig(**values),
            data=DataConfig(shards=str(shards)),
            eval=EvalConfig(),
        )
        .at_horizon()
        .validate()
    )
