"""A router from outside the package, as docs/adding-a-router.md tells a researcher to write it.

The page's Python block becomes `myrouter.py` and its TOML block's entry point a `myrouter-0.1.dist-info`,
both in a temporary folder on the path, exactly what `pip install` of the researcher's project leaves; gtmoe
is not edited. The page's YAML variant then trains through `python -m gtmoe train`.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from gtmoe.config import load_run_config
from gtmoe.contract import CHECKPOINT
from gtmoe.model import build_model
from gtmoe.routers import registry

from conftest import tiny_run
from helpers import REPO, run_module

DOC = REPO / "docs" / "adding-a-router.md"
GROUP = "gtmoe.routers"


def doc_blocks(language: str) -> list[str]:
    """The page's fenced code blocks in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)


def install(root: Path, module: str, code: str, entry_points: dict[str, str], dist: str = "myrouter") -> Path:
    """`module`.py plus a dist-info declaring `entry_points` (name -> value) in the group gtmoe.routers."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(code)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}")
    return root


def documented_entry_points() -> dict[str, str]:
    project = tomllib.loads(doc_blocks("toml")[0])["project"]
    return project["entry-points"][GROUP]


@pytest.fixture
def plugin(tmp_path) -> Path:
    """The documented router installed as the documented entry point, in tmp_path/site."""
    return install(tmp_path / "site", "myrouter", doc_blocks("python")[0], documented_entry_points())


@pytest.fixture
def fresh_registry(monkeypatch, tmp_path):
    """A registry that discovers again (package modules are cached, so only plug-ins load), undone after."""
    registry.known()  # the package's own routers register in the real registry, never only in the copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_discovered", False)
    yield registry
    for name, module in list(sys.modules.items()):  # forget the plug-in modules this test imported
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def pythonpath(*folders: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(map(str, [*folders, REPO]))}


def test_the_documented_router_is_listed_and_trains_through_the_cli(
    plugin, tmp_path, tiny_shards, fresh_registry, monkeypatch
):
    env = pythonpath(plugin)
    listing = run_module("gtmoe", "routers", env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert any(line.startswith('fixed_noise {"aux_loss_coef"') for line in listing.stdout.splitlines())

    # The page's variant, in a tiny run config (the run config a workflow job receives).
    variant = next(v for v in yaml.safe_load(doc_blocks("yaml")[0])["variants"] if v["router"] == "fixed_noise")
    options = {k: v for k, v in variant.items() if k not in ("name", "router")}
    run_config = tiny_run(tiny_shards, "topk", max_steps=4).to_dict()
    run_config.update(variant=variant["name"], router={"name": variant["router"], **options})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    run_dir = tmp_path / "runs" / variant["name"] / "seed0"
    trained = run_module("gtmoe", "train", "--config", tmp_path / "run.yaml", "--out", run_dir, env=env, timeout=120)
    assert trained.returncode == 0, trained.stderr

    log = pd.read_parquet(run_dir / "train_log.parquet")
    assert log["flip_rate_noise"].notna().all()  # the selection term is logged under its name
    weights = torch.load(run_dir / CHECKPOINT, weights_only=False)["model"]
    noise = {key: value for key, value in weights.items() if key.endswith("router.noise")}
    assert len(noise) == run_config["model"]["n_layers"]  # one fixed bias per MoE layer, checkpointed
    first, second = noise.values()
    assert not torch.equal(first, second) and first.abs().min() > 0

    # Fixed: the trained checkpoint holds the very draw the model made when built from the run's seed.
    monkeypatch.syspath_prepend(str(plugin))
    monkeypatch.setattr(fresh_registry, "_discovered", False)  # tiny_run above discovered without the plug-in
    cfg = load_run_config(tmp_path / "run.yaml")
    torch.manual_seed(cfg.train.seed)
    built = build_model(cfg).state_dict()
    assert all(torch.equal(built[key], value) for key, value in noise.items())
    assert options["noise"] * 0.2 < torch.cat(list(noise.values())).std() < options["noise"] * 5


def test_the_documented_router_describes_itself(plugin, fresh_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin))
    assert "fixed_noise" in fresh_registry.known() and {"topk", "rdesi", "dense"} <= set(fresh_registry.known())
    assert fresh_registry.describe("fixed_noise") == {
        "label": "top-k + fixed noise",
        "routed": True,
        "balanced_by_construction": False,
        "terms": {"noise": "fixed noise b"},
        "states": {},
        "balance_knob": "aux_loss_coef",
    }


def test_a_duplicate_plugin_stops_the_cli_with_the_documented_line(tmp_path):
    code = doc_blocks("python")[0].replace('@register("fixed_noise")', '@register("topk")')
    site = install(tmp_path / "site", "myrouter", code, documented_entry_points())
    listing = run_module("gtmoe", "routers", env=pythonpath(site), timeout=120)
    assert listing.returncode == 2 and listing.stdout == ""
    documented = next(block for block in doc_blocks("text") if "registered twice" in block)
    assert listing.stderr == documented


BROKEN = {
    "import": ("import not_an_installed_module\n", r"failed to import: ModuleNotFoundError: No module named"),
    "nothing": ("VALUE = 1\n", r"module 'broken_nothing' registers no router \(decorate one with @register\)"),
    "label": (
        "from gtmoe.routers.registry import register\n"
        "from gtmoe.routers.topk import TopKRouter\n\n\n"
        '@register("unlabelled")\n'
        "class Unlabelled(TopKRouter):\n"
        '    state_names = ("visits",)\n',
        r"router 'unlabelled' \(broken_label.Unlabelled\): state_labels lacks \['visits'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_plugin_is_one_config_error_naming_the_entry_point(case, tmp_path, fresh_registry, monkeypatch):
    from gtmoe.errors import ConfigError

    code, cause = BROKEN[case]
    module = f"broken_{case}"
    monkeypatch.syspath_prepend(str(install(tmp_path, module, code, {"broken": module}, dist="broken")))
    where = rf"^router plug-in 'broken' \(entry point '{module}' in group 'gtmoe.routers'\)"
    with pytest.raises(ConfigError, match=f"{where}.*{cause}") as caught:
        fresh_registry.known()
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=where):  # refused again, never half-loaded
        fresh_registry.get("topk")
