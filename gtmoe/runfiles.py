"""Run files: atomic writes, checkpoints with manifests, and the errors that say how to recover.

Every checkpoint is written atomically (temporary sibling, fsync, rename) and has a manifest
beside it, `<checkpoint>.manifest.json` (size and sha256, written and checked by `gtmoe.files`), which
`load_checkpoint` verifies, so a truncated or corrupted file is reported by name with the way to
recover instead of being loaded. Every other run file goes through `gtmoe.files.write_atomic`. File
names are gtmoe.contract's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import torch

from gtmoe.config import RunConfig
from gtmoe.contract import (
    CHECKPOINT,
    MODEL_FORMAT,
    RESUME_CHECKPOINT,
    SATURATION_CHECKPOINT,
    TRAIN_OUTPUTS,
    weight_config,
)
from gtmoe.files import (
    HashingWriter,
    ManifestMismatch,
    file_entry,
    remove_stale_temporaries,
    temporary,
    verify_file,
    write_manifest,
)

log = logging.getLogger("gtmoe.runfiles")

MANIFEST_SUFFIX = ".manifest.json"  # checkpoint.pt -> checkpoint.pt.manifest.json
# Every file `train` writes into a run directory (manifests are `<checkpoint>.manifest.json`):
# their temporaries `.<name>.tmp-PID` are cleared when training starts.
RUN_DIR_FILES = (*TRAIN_OUTPUTS, RESUME_CHECKPOINT, SATURATION_CHECKPOINT)


from gtmoe.errors import NonFiniteLossError, RunError  # noqa: E402,F401  (re-exported)


def manifest_path(checkpoint: Path) -> Path:
    """The manifest of a checkpoint: `checkpoint.pt` -> `checkpoint.pt.manifest.json`."""
    return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwritable(path: Path, exc: OSError, what: str) -> RunError:
    """The RunError for an OSError writing `path`: names it (or the ancestor that is a file) and what to do.

    Only "not a directory" / "exists" errors are blamed on a file in the way; a full disk
    or a permission error over an existing file is reported as what it is.
    """
    reason = exc.strerror or str(exc)
    ancestor = None
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        ancestor = next((p for p in (path, *path.parents) if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        reason = f"{ancestor} is a file, not a directory"
    elif exc.filename and Path(exc.filename) != path:
        reason = f"{reason}: {exc.filename}"
    return RunError(f"cannot write {what} {path} ({reason}); {_WRITE_RECOVERY}")


# How to get past a failed write (full disk, permissions): nothing finished is lost, a rerun continues.
_WRITE_RECOVERY = "pass another --out, or free space or fix the permissions there and rerun"


def prepare_run_dir(out_dir: Path) -> None:
    """Create the run directory, or raise a RunError naming it (a file in the way, read-only, ...)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(out_dir, exc, "the run directory") from None
    # Temporary files of a process killed mid-write (checkpoints, manifests, config, logs,
    # summary): never valid, possibly checkpoint-sized.
    remove_stale_temporaries(out_dir, *(f"{name}*" for name in RUN_DIR_FILES))


def _write_manifest(checkpoint: Path, entry: dict, replaces: dict | None) -> None:
    write_manifest(manifest_path(checkpoint), {"file": checkpoint.name, **entry, "replaces": replaces}, durable=True)


def _read_manifest(checkpoint: Path) -> dict | None:
    """The checkpoint's manifest, None if it has none; a RunError if it is unreadable."""
    path = manifest_path(checkpoint)
    try:
        manifest = json.loads(path.read_text())
        for entry in (manifest, manifest.get("replaces") or {"bytes": 0, "sha256": ""}):
            if not (isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)):
                raise ValueError("'bytes' must be an integer and 'sha256' a string")
        return manifest
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunError(
            f"checkpoint manifest {path} is unreadable ({exc.__class__.__name__}: {exc}), so "
            f"{checkpoint} cannot be verified; {_recovery(checkpoint)}"
        ) from exc


def _recovery(checkpoint: Path) -> str:
    """How to get past a bad checkpoint: what to delete, and what reruns."""
    run_dir, manifest = checkpoint.parent, manifest_path(checkpoint)
    if checkpoint.name == RESUME_CHECKPOINT:
        return (
            f"delete it (`rm {checkpoint} {manifest}`) and rerun snakemake or `python -m gtmoe train "
            f"--out {run_dir}`: the run restarts from step 0"
        )
    return (
        f"retrain the run: delete {run_dir} and rerun snakemake (or `python -m gtmoe train --out {run_dir}`; "
        f"`snakemake --forcerun {run_dir / CHECKPOINT}` also does it)"
    )


def retrain_recovery(checkpoint: Path) -> str:
    """How to get past a bad or missing checkpoint of a run directory (for the rolling one: restart it)."""
    return _recovery(Path(checkpoint))


def save_checkpoint(obj: dict, path: Path) -> dict:
    """Write `obj` (and the model format) to `path` atomically, with its manifest. Returns the manifest
    entry (bytes, sha256).

    Order: the checkpoint to a temporary sibling (hashed on the way) and fsync;
    then the manifest, atomically, naming the new content and the one it
    replaces; then the rename over `path`. A process killed at any point leaves
    `path` holding the old or the new checkpoint, and the manifest matches
    either. A failed write (disk full, ...) leaves the old checkpoint in place.
    """
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as handle:
            writer = HashingWriter(handle)  # torch.save writes its zip archive strictly sequentially
            torch.save({**obj, "model_format": MODEL_FORMAT}, writer)
            handle.flush()
            os.fsync(handle.fileno())
        entry = writer.entry()
        try:
            previous = _read_manifest(path) if path.exists() else None
        except RunError:  # an unreadable manifest describes nothing worth keeping
            previous = None
        replaces = {"bytes": previous["bytes"], "sha256": previous["sha256"]} if previous else None
        _write_manifest(path, entry, replaces)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:  # torch.save may wrap a failed write in a RuntimeError
        if isinstance(exc, RunError):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        kept = "the previous checkpoint is kept; " if path.exists() else ""
        raise RunError(
            f"cannot write checkpoint {path} ({reason}); {kept}free space or fix the "
            "permissions there and rerun to resume"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return entry


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def verify_checkpoint(path: Path, *, repair_manifest: bool = False) -> dict | None:
    """Check `path` against its manifest (size, then sha256); a RunError naming the file and the fix if not.
    Returns the manifest entry (bytes, sha256) the file matched, None if it has no manifest.

    A checkpoint without a manifest (written by an older gtmoe) is accepted with
    a warning. A checkpoint that matches the content its manifest says it
    *replaces* is the old one, left by a kill between the manifest's and the
    checkpoint's renames: valid, and with `repair_manifest` the manifest is
    rewritten to describe it (training does this before it writes again).
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(
            f"checkpoint {path} does not exist; train the run first (snakemake, or "
            f"`python -m gtmoe train --out {path.parent}`)"
        )
    manifest = _read_manifest(path)
    if manifest is None:
        log.warning(
            "checkpoint %s has no manifest %s (written by an older gtmoe?); loading it unverified",
            path,
            manifest_path(path).name,
        )
        return None
    candidates = [manifest] + ([manifest["replaces"]] if manifest.get("replaces") else [])
    try:
        match = verify_file(path, manifest_path(path), candidates)
    except ManifestMismatch as exc:
        raise RunError(f"checkpoint {exc}; {_recovery(path)}") from None
    if match is not manifest and repair_manifest:
        _write_manifest(path, {"bytes": match["bytes"], "sha256": match["sha256"]}, None)
    return {"bytes": match["bytes"], "sha256": match["sha256"]}


def load_checkpoint(path: Path, device: torch.device | str = "cpu", *, repair_manifest: bool = False) -> dict:
    """Verify a checkpoint against its manifest, then load it. Errors name the file and how to recover."""
    path = Path(path)
    verify_checkpoint(path, repair_manifest=repair_manifest)
    return _torch_load(path, map_location=device)


def map_checkpoint(path: Path) -> tuple[dict, dict | None]:
    """Verify a checkpoint against its manifest, then map it into host memory (torch.load's mmap): a
    tensor's bytes are read only when it is used, so taking the weights out of a finished checkpoint costs
    the weights, not AdamW's two moments beside them. Returns the state and the manifest entry the file
    matched (None: it has no manifest). The file stays mapped while any of the state's tensors is referenced.
    """
    path = Path(path)
    entry = verify_checkpoint(path)
    return _torch_load(path, map_location="cpu", mmap=True), entry


def _torch_load(path: Path, **options) -> dict:
    try:
        state = torch.load(path, weights_only=False, **options)
    except Exception as exc:  # unverified (no manifest) and unreadable: say which and how to recover
        raise RunError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}: {exc}); {_recovery(path)}") from exc
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path} holds a {type(state).__name__}, not a GT-MoE checkpoint; {_recovery(path)}")
    found = state.get("model_format", 1)
    if found != MODEL_FORMAT:
        raise RunError(
            f"checkpoint {path} holds a model of format {found}, and this version of GT-MoE reads format "
            f"{MODEL_FORMAT} (see gtmoe.contract.MODEL_FORMAT); {_recovery(path)}"
        )
    return state


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def config_differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, current value) for every key in which two run configs (as `to_dict` writes
    them) differ as runs: compared through weight_config, the one definition of "the same run"."""
    a, b = _flatten(weight_config(stored)), _flatten(weight_config(current))
    missing = object()
    return [
        (key, a.get(key, missing), b.get(key, missing))
        for key in sorted(a.keys() | b.keys())
        if a.get(key, missing) != b.get(key, missing)
    ]


def describe_differences(differences: list[tuple[str, object, object]], old: str, new: str) -> str:
    """At most five differing keys with both values, for an error message."""
    shown = ", ".join(f"{key} ({_short(a)} in {old}, {_short(b)} in {new})" for key, a, b in differences[:5])
    return shown + (f" and {len(differences) - 5} more" if len(differences) > 5 else "")


def _short(value, limit: int = 40) -> str:
    text = "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_config_matches_checkpoint(config_path: Path, cfg: RunConfig, checkpoint: Path, stored: dict | None) -> None:
    """A RunError naming the keys in which `config_path` differs from the config `checkpoint` was trained with."""
    if stored is None:
        log.warning(
            "checkpoint %s records no run config (older gtmoe); cannot check it against %s", checkpoint, config_path
        )
        return
    differences = config_differences(stored, cfg.to_dict())
    if not differences:
        return
    shown = describe_differences(differences, "the checkpoint", config_path.name)
    raise RunError(
        f"{config_path} differs from the config {checkpoint} was trained with: {shown}; "
        f"restore {config_path.name} to the trained values, or retrain the run with the new ones "
        f"(delete {checkpoint.parent} and rerun snakemake)"
    )


# --------------------------------------------------------------------------- which run wrote a checkpoint

RUN_IDENTITY = "run"  # every checkpoint's key: the run that wrote it (checkpoint_identity)
SATURATION_RECORD = "saturation"  # the rolling and final checkpoints' key: the run's saturation checkpoint


def checkpoint_identity(cfg: RunConfig, step: int) -> dict:
    """What ties a checkpoint to the run that wrote it, beside the run config it records: variant, seed, step."""
    return {"variant": cfg.variant, "seed": cfg.train.seed, "step": step}


def saturation_record(step: int, entry: dict) -> dict:
    """What the run's later checkpoints record of its saturation checkpoint: its step and manifest entry."""
    return {"file": SATURATION_CHECKPOINT, "step": step, "bytes": entry["bytes"], "sha256": entry["sha256"]}


def _retrain_older(path: Path, missing: str) -> RunError:
    return RunError(
        f"checkpoint {path} records no {missing}: it was written by an older version of GT-MoE (or not by "
        f"`gtmoe train`), so it cannot be tied to its run; {_recovery(path)}"
    )


def check_checkpoint_identity(path: Path, state: dict, cfg: RunConfig) -> None:
    """A RunError naming `path` unless the checkpoint (loaded as `state`) records that the run `cfg` wrote it:
    the same variant and seed, at the step it holds. A checkpoint of a GT-MoE before identities: retrain."""
    identity = state.get(RUN_IDENTITY)
    if not (isinstance(identity, dict) and {"variant", "seed", "step"} <= identity.keys()):
        raise _retrain_older(path, "run identity (variant, seed, step)")
    wrote, wanted = (identity["variant"], identity["seed"]), (cfg.variant, cfg.train.seed)
    if wrote != wanted:
        raise RunError(
            f"checkpoint {path} was written by another run (variant {wrote[0]!r}, seed {wrote[1]}), not by this "
            f"one (variant {wanted[0]!r}, seed {wanted[1]}); {_recovery(path)}"
        )
    if identity["step"] != state.get("step"):
        raise RunError(
            f"checkpoint {path} records step {identity['step']} in its identity but holds step "
            f"{state.get('step')!r}, so it was not written as a whole by `gtmoe train`; {_recovery(path)}"
        )


def check_saturation_checkpoint(path: Path, state: dict, entry: dict | None, final: Path, record) -> None:
    """A RunError naming `path` unless it is the saturation checkpoint the run wrote: `record` (what the
    finished checkpoint `final` records of it, `saturation_record`) names the same step and sha256 as the
    file (`entry`: its manifest entry, None when it has none). Check `check_checkpoint_identity` first: it
    says which run wrote a foreign file."""
    if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)):
        raise _retrain_older(final, f"saturation checkpoint ({path.name} and its sha256)")
    sha256 = (entry or file_entry(path))["sha256"]
    if sha256 != record["sha256"] or state.get("step") != record.get("step"):
        raise RunError(
            f"checkpoint {path} is not the saturation checkpoint this run wrote: {final.name} records step "
            f"{record.get('step')}, sha256 {record['sha256'][:12]}..., the file holds step {state.get('step')!r}, "
            f"sha256 {sha256[:12]}... (copied from another run, or rewritten); {_recovery(path)}"
        )
