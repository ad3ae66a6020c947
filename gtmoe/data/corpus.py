"""The WikiText corpora (:data:`CORPORA`: sources, published checksums and counts) and the ``corpus``
stage: load from the verified local copy or the hub, write ``{split}.txt`` + ``corpus.json``, read back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gtmoe.contract import SPLITS
from gtmoe.data.errors import DataError
from gtmoe.data.files import _atomic_path, _write_manifest, _writing
from gtmoe.files import HashingWriter, ManifestMismatch, remove_stale_temporaries, verify_file

LOCAL_FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HUB_ID, HUB_CONFIG = "Salesforce/wikitext", "wikitext-2-v1"
# Published checksums of the local files (../shared/data/SOURCES.md).
LOCAL_SHA256 = {
    "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "validation": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}


@dataclass(frozen=True)
class CorpusSpec:
    """One WikiText release (the tokenized "-v1" files): where it comes from and what it must contain.

    ``checksums`` maps split -> (hashlib algorithm, published hex digest) of the original local file;
    ``lines`` and ``words`` (:func:`count_words`) are the published sizes, which hold for both sources.
    """

    name: str
    hub_config: str
    local_files: dict[str, str]
    checksums: dict[str, tuple[str, str]]
    checksums_from: str
    lines: dict[str, int]
    words: dict[str, int]


CORPORA = {
    "wikitext-2": CorpusSpec(
        name="wikitext-2",
        hub_config=HUB_CONFIG,
        local_files=LOCAL_FILES,
        checksums={split: ("sha256", digest) for split, digest in LOCAL_SHA256.items()},
        checksums_from="../shared/data/SOURCES.md",
        lines={"train": 36_718, "validation": 3_760, "test": 4_358},
        words={"train": 2_088_628, "validation": 217_646, "test": 245_569},
    ),
    # No per-file sha256 of WikiText-103 is published anywhere we could find (the `datasets`
    # dataset_infos.json has only the zip's: 242ba0f2...539590). GluonNLP publishes per-file SHA-1
    # (dmlc/gluon-nlp src/gluonnlp/data/corpora/wikitext.py); its WikiText-2 SHA-1s match the files
    # whose sha256 SOURCES.md lists, so we verify those. corpus.json records the sha256 we compute.
    # Counts: Merity et al. 2016, Table 1 (words); lines = the hub's num_examples.
    "wikitext-103": CorpusSpec(
        name="wikitext-103",
        hub_config="wikitext-103-v1",
        local_files=LOCAL_FILES,
        checksums={
            "train": ("sha1", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
            "validation": ("sha1", "c326ac59dc587676d58c422eb8a03e119582f92b"),
            "test": ("sha1", "8a5befc548865cec54ed4273cf87dbbad60d1e47"),
        },
        checksums_from="GluonNLP (dmlc/gluon-nlp, src/gluonnlp/data/corpora/wikitext.py)",
        lines={"train": 1_801_350, "validation": 3_760, "test": 4_358},
        words={"train": 103_227_021, "validation": 217_646, "test": 245_569},
    ),
}
DEFAULT_CORPUS = "wikitext-2"

_WRITE_LINES = 65536  # lines per slice when writing a split's text

CORPUS_META = "corpus.json"


def _split_lines(text: str) -> list[str]:
    """Lines of ``text`` without their newlines (``str.splitlines`` would also split on \\x0b, \\x1c, ...)."""
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line opens no new line
        lines.pop()
    return lines


def _as_hub_row(line: str) -> str:
    """Normalise a line to the row the hub serves, minus its newline.

    The hub's loader kept non-blank lines verbatim and turned whitespace-only lines (" " in the files)
    into "", so both sources yield identical corpora and therefore identical tokens.
    """
    line = line.removesuffix("\n")
    return line if line.strip() else ""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def corpus_spec(name: str) -> CorpusSpec:
    """The :class:`CorpusSpec` called ``name`` (a key of :data:`CORPORA`)."""
    try:
        return CORPORA[name]
    except KeyError:
        raise DataError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}") from None


def _load_local(local_dir: Path, verify: bool, spec: CorpusSpec) -> tuple[dict, dict, dict]:
    corpus, origins, provenance = {}, {}, {}
    for split in SPLITS:
        path = local_dir / spec.local_files[split]
        if not path.is_file():
            raise DataError(
                f"{path} not found: {local_dir} must hold the {spec.name} files "
                f"{', '.join(spec.local_files.values())} (see docs/data.md)"
            )
        data = path.read_bytes()
        algorithm, published = spec.checksums[split]
        if verify and (actual := hashlib.new(algorithm, data).hexdigest()) != published:
            raise DataError(
                f"{path}: {algorithm} {actual} does not match the published {published} of {spec.name} "
                f"({spec.checksums_from}); restore the original file, or pass --no-verify "
                "(verify=False) to use a modified copy on purpose"
            )
        # The original file's sha256, recorded in corpus.json (the written {split}.txt differs from it:
        # blank lines " " become ""); for WikiText-103 it is the only sha256 there is.
        provenance[split] = {"local_sha256": hashlib.sha256(data).hexdigest()}
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}); restore the original file") from exc
        del data  # WikiText-103's train split is ~540 MB: hold the bytes and the text only briefly
        corpus[split] = [_as_hub_row(line) for line in _split_lines(text)]
        origins[split] = f"local:{path.resolve()}"
    return corpus, origins, provenance


def _load_hub(spec: CorpusSpec) -> tuple[dict, dict, dict]:
    import datasets  # slow to import and only needed on this path

    try:
        dataset = datasets.load_dataset(HUB_ID, spec.hub_config)
    except Exception as exc:  # offline, DNS, auth, cache and not-found all surface as different types
        raise DataError(f"could not load the hub dataset {HUB_ID} ({spec.hub_config}): {exc}") from exc
    corpus, origins = {}, {}
    for split in SPLITS:
        try:
            rows = dataset[split]["text"]
        except KeyError as exc:
            raise DataError(f"the hub dataset {HUB_ID} ({spec.hub_config}) has no {split!r} split") from exc
        corpus[split] = [_as_hub_row(row) for row in rows]
        origins[split] = f"hub:{HUB_ID}/{spec.hub_config}:{split}"
    return corpus, origins, {split: {} for split in SPLITS}


def _load_corpus_with_origins(
    local_dir: str | Path | None, source: str, verify: bool, corpus_name: str = DEFAULT_CORPUS
) -> tuple[dict[str, list[str]], dict[str, str], dict[str, dict]]:
    """Like :func:`load_corpus`, also returning where each split came from and the local file's sha256."""
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', not {source!r}")
    spec = corpus_spec(corpus_name)
    local = Path(local_dir) if local_dir is not None else None
    has_local = local is not None and all((local / name).is_file() for name in spec.local_files.values())

    if source == "local":
        if local is None:
            raise DataError(f"source='local' needs a local directory (--local-dir) holding the {spec.name} files")
        corpus, origins, provenance = _load_local(local, verify, spec)
    elif source == "auto" and has_local:
        corpus, origins, provenance = _load_local(local, verify, spec)
    else:
        try:
            corpus, origins, provenance = _load_hub(spec)
        except DataError as exc:
            if source == "hub":
                raise
            tried = f"the local directory {local}" if local is not None else "no local directory (none given)"
            raise DataError(
                f"no {spec.name} source available: tried {tried} (needs {', '.join(spec.local_files.values())}) "
                f"and the hub dataset {HUB_ID} ({spec.hub_config}), which failed: {exc.__cause__ or exc}. "
                f"Point --local-dir at ../shared/data/{spec.name} or make the hub reachable."
            ) from exc

    for split in SPLITS:
        if not any(line.strip() for line in corpus[split]):
            raise DataError(f"split {split!r} from {origins[split]} is empty (no non-blank lines)")
    return corpus, origins, provenance


def load_corpus(
    local_dir: str | Path | None, source: str = "auto", *, verify: bool = True, corpus: str = DEFAULT_CORPUS
) -> dict[str, list[str]]:
    """Load a WikiText release (``corpus``, a key of :data:`CORPORA`) as ``split -> lines``.

    Each line comes without its newline (the rows the hub serves). ``source``: "auto" (local files
    when ``local_dir`` has all three, else the hub), "local" or "hub". Local files are checked
    against the published checksums unless ``verify=False``.
    """
    return _load_corpus_with_origins(local_dir, source, verify, corpus)[0]


def check_published_counts(corpus: dict[str, Sequence[str]], spec: CorpusSpec, origins: dict[str, str]) -> None:
    """Raise :class:`DataError` unless every split has the published line and word counts of ``spec``.

    The local checksums already pin the files; this also covers the hub, which has none.
    """
    for split in SPLITS:
        lines, words = len(corpus[split]), count_words(corpus[split])
        if (lines, words) != (spec.lines[split], spec.words[split]):
            raise DataError(
                f"split {split!r} from {origins[split]} has {lines:,} lines / {words:,} words, but the published "
                f"{spec.name} {split} split has {spec.lines[split]:,} / {spec.words[split]:,}; the source is "
                "incomplete or a different release (pass --no-verify to use it anyway)"
            )


def count_words(lines: Sequence[str]) -> int:
    """Whitespace-separated words plus one end-of-line per line: the published WikiText word counts."""
    return sum(len(line.split()) for line in lines) + len(lines)


def write_corpus(
    corpus: dict[str, list[str]],
    out_dir: str | Path,
    *,
    sources: dict[str, str] | None = None,
    extra: dict[str, dict] | None = None,
) -> dict:
    """Write ``{out_dir}/{split}.txt`` (one newline-terminated line per row) and ``corpus.json``.

    ``corpus.json`` holds, per split, lines, words, bytes, sha256 of the written file, its source and
    the fields of ``extra[split]``; it is written last, so its presence marks a complete corpus.
    Returns its content.
    """
    out = Path(out_dir)
    with _writing(out / CORPUS_META):
        (out / CORPUS_META).unlink(missing_ok=True)
        if out.is_dir():
            remove_stale_temporaries(out, CORPUS_META, *(f"{split}.txt" for split in SPLITS))
    summary = {}
    for split in SPLITS:
        lines = corpus.get(split)
        if not lines:
            raise DataError(f"split {split!r} is missing or empty; nothing to write to {out / f'{split}.txt'}")
        if any("\n" in line for line in lines):
            raise ValueError(f"split {split!r}: lines must not contain newlines")
        with _atomic_path(out / f"{split}.txt") as tmp:
            with open(tmp, "wb") as f:
                writer = HashingWriter(f)
                # In slices, so WikiText-103's ~540 MB train split is never one more string in memory.
                for lo in range(0, len(lines), _WRITE_LINES):
                    writer.write("".join(line + "\n" for line in lines[lo : lo + _WRITE_LINES]).encode("utf-8"))
        summary[split] = {
            "lines": len(lines),
            "words": count_words(lines),
            **writer.entry(),
            "source": (sources or {}).get(split, "unspecified"),
            **(extra or {}).get(split, {}),
        }
    _write_manifest(out / CORPUS_META, summary)
    return summary


def read_corpus_split(corpus_dir: str | Path, split: str) -> list[str]:
    """Lines of one split of a corpus written by :func:`write_corpus`, verified against ``corpus.json``."""
    _check_split(split)
    corpus_dir = Path(corpus_dir)
    rebuild = f"rerun `python -m gtmoe prepare corpus --out {corpus_dir}`"
    meta_path = corpus_dir / CORPUS_META
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: {corpus_dir} is not a complete corpus; {rebuild}")
    entry = json.loads(meta_path.read_text()).get(split)
    if entry is None:
        raise DataError(f"{meta_path} has no entry for split {split!r}; {rebuild}")
    path = corpus_dir / f"{split}.txt"
    try:
        verify_file(path, meta_path, [entry])
    except ManifestMismatch as exc:
        raise DataError(f"{exc}; {rebuild}") from None
    # The bytes go once decoded: never the bytes, the text and the lines of a large split in memory at once.
    return _split_lines(path.read_bytes().decode("utf-8"))
