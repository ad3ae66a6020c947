"""Tests of gtmoe.data: corpus loading, tokenizer, Arrow shards and the prepare CLI."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from gtmoe import data
from gtmoe.data import (
    EOT,
    HUB_ID,
    LOCAL_FILES,
    SPLITS,
    UNK,
    DataError,
    TokenBlocks,
    add_prepare_parser,
    count_words,
    encode_split,
    load_corpus,
    read_corpus_split,
    train_tokenizer,
    write_corpus,
    write_shards,
)

REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2"
needs_real = pytest.mark.skipif(
    not all((REAL_DIR / name).is_file() for name in LOCAL_FILES.values()),
    reason=f"real WikiText-2 copy not found at {REAL_DIR}",
)

# Two tiny articles in the WikiText layout, including a table row (" = Goals ; A = ") that matches
# the title pattern but is no title because it does not stand between blank lines.
ARTICLE_LINES = [
    "",
    " = Alpha Beta = ",
    "",
    " Alpha Beta is a <unk> of 1 @,@ 200 letters . ",
    " Key : G ",
    " = Goals ; A = ",
    " Assists ",
    "",
    " = = History = = ",
    "",
    " It was first used in <unk> , the <unk> city . ",
    "",
    " = Gamma = ",
    "",
    " Gamma follows Beta in the alphabet and is <unk> . ",
    "",
]


def write_wikitext(directory: Path, lines_by_split: dict[str, list[str]]) -> Path:
    """Write raw WikiText files: blank lines are " " and every line ends with a newline, as in the release."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in lines_by_split.items():
        text = "".join((line if line.strip() else " ") + "\n" for line in lines)
        (directory / LOCAL_FILES[split]).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture
def wikitext_dir(tmp_path: Path) -> Path:
    return write_wikitext(tmp_path / "wikitext", {split: ARTICLE_LINES * 3 for split in SPLITS})


@pytest.fixture
def tokenizer(tmp_path: Path):
    return train_tokenizer(ARTICLE_LINES * 3, 300, tmp_path / "tokenizer.json")


# --------------------------------------------------------------------------- corpus


@needs_real
def test_real_files_reproduce_published_counts():
    corpus = load_corpus(REAL_DIR, source="local")
    assert {split: len(lines) for split, lines in corpus.items()} == {"train": 36718, "validation": 3760, "test": 4358}
    assert {split: count_words(lines) for split, lines in corpus.items()} == {
        "train": 2_088_628,
        "validation": 217_646,
        "test": 245_569,
    }
    assert sum(line.split().count(UNK) for line in corpus["train"]) == 54_625


@needs_real
def test_real_files_have_600_60_60_articles():
    corpus = load_corpus(REAL_DIR, source="local")
    # Every article title but the first gets an end-of-text token before it.
    assert [len(data._article_starts(corpus[split])) for split in SPLITS] == [599, 59, 59]


def test_local_rows_equal_hub_rows(wikitext_dir, monkeypatch):
    # The hub serves non-blank lines with their newline and blank lines as "".
    hub_rows = {split: [line + "\n" if line.strip() else "" for line in ARTICLE_LINES * 3] for split in SPLITS}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: {s: {"text": r} for s, r in hub_rows.items()})
    local = load_corpus(wikitext_dir, source="local", verify=False)
    assert local == load_corpus(None, source="hub")
    assert local["train"][:2] == ["", " = Alpha Beta = "]


def test_checksum_mismatch_names_the_file(wikitext_dir):
    with pytest.raises(DataError, match="wiki.train.tokens.*sha256"):
        load_corpus(wikitext_dir, source="local")


def test_missing_local_and_unreachable_hub_names_both(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_corpus(missing, source="auto")
    assert str(missing) in str(info.value) and HUB_ID in str(info.value)


def test_missing_local_file_with_local_source(tmp_path):
    write_wikitext(tmp_path, {"train": ARTICLE_LINES, "validation": ARTICLE_LINES})
    with pytest.raises(DataError, match="wiki.test.tokens not found"):
        load_corpus(tmp_path, source="local", verify=False)


def test_empty_split_is_named(tmp_path):
    write_wikitext(tmp_path, {"train": ARTICLE_LINES, "validation": [], "test": ARTICLE_LINES})
    with pytest.raises(DataError, match="'validation'.*empty"):
        load_corpus(tmp_path, source="local", verify=False)


def test_write_and_read_corpus_round_trip(wikitext_dir, tmp_path):
    corpus = load_corpus(wikitext_dir, source="local", verify=False)
    summary = write_corpus(corpus, tmp_path / "corpus", sources={split: "test" for split in SPLITS})
    assert json.loads((tmp_path / "corpus" / "corpus.json").read_text()) == summary
    for split in SPLITS:
        assert read_corpus_split(tmp_path / "corpus", split) == corpus[split]
        written = (tmp_path / "corpus" / f"{split}.txt").read_bytes()
        assert summary[split]["bytes"] == len(written)
        assert summary[split]["sha256"] == hashlib.sha256(written).hexdigest()
        assert summary[split]["lines"] == len(corpus[split]) == written.count(b"\n")
        assert summary[split]["words"] == count_words(corpus[split])


def test_read_corpus_split_detects_modified_file(wikitext_dir, tmp_path):
    write_corpus(load_corpus(wikitext_dir, source="local", verify=False), tmp_path)
    path = tmp_path / "test.txt"
    with open(path, "a") as f:
        f.write(" extra line \n")
    with pytest.raises(DataError, match=r"test\.txt has \d+ bytes but its manifest corpus\.json says .*modified"):
        read_corpus_split(tmp_path, "test")
    path.write_bytes(path.read_bytes()[: -len(" extra line \n")].replace(b"a", b"b", 1))  # same size
    with pytest.raises(DataError, match=r"test\.txt does not match the sha256 in its manifest corpus\.json"):
        read_corpus_split(tmp_path, "test")


# --------------------------------------------------------------------------- tokenizer and encoding


def test_tokenizer_round_trip_and_unk_is_one_id(tokenizer, tmp_path):
    text = " Alpha is a <unk> letter , and <unk> too . \n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    unk_id = tokenizer.token_to_id(UNK)
    assert ids.count(unk_id) == 2
    assert not any("unk" in tokenizer.id_to_token(i) for i in ids if i != unk_id)
    # The saved file is the same tokenizer.
    reloaded = data.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert reloaded.encode(text).ids == ids


def test_tokenizer_is_deterministic(tmp_path):
    for name in ("a.json", "b.json"):
        train_tokenizer(ARTICLE_LINES * 3, 300, tmp_path / name)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_vocab_too_small_names_the_minimum(tmp_path):
    with pytest.raises(DataError, match=r"vocab_size=257.*258"):
        train_tokenizer(ARTICLE_LINES, 257, tmp_path / "tokenizer.json")
    assert not (tmp_path / "tokenizer.json").exists()


def test_encode_split_keeps_lines_and_separates_articles(tokenizer):
    lines = ARTICLE_LINES * 2
    tokens = encode_split(tokenizer, lines)
    assert tokens.dtype == np.int32 and tokens.flags.c_contiguous
    eot_id = tokenizer.token_to_id(EOT)
    assert tokens[0] != eot_id
    # Titles " = Gamma = ", then " = Alpha Beta = " and " = Gamma = " of the copy: three boundaries, no table row.
    assert np.count_nonzero(tokens == eot_id) == 3
    decoded = tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
    assert decoded.replace(EOT, "") == "".join(line + "\n" for line in lines)
    assert decoded.count(f"\n{EOT} = Gamma = \n") == 2


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("n_tokens", [2, 8, 50, 51, 64])
def test_every_token_is_a_target_exactly_once(tmp_path, n_tokens):
    seq_len = 7
    tokens = np.random.default_rng(n_tokens).integers(1, 1000, n_tokens, dtype=np.int32)
    manifest = write_shards(tokens, tmp_path, seq_len, n_words=5, rows_per_shard=3)
    blocks = TokenBlocks(tmp_path)
    assert len(blocks) == manifest["n_blocks"] == -(-(n_tokens - 1) // seq_len)
    x, y = blocks.batch(np.arange(len(blocks)))
    # Blocks overlap by one token: the first input plus all real targets rebuild the stream.
    rebuilt = np.concatenate([x[:1, 0].numpy(), y[y != data.IGNORE_INDEX].numpy()])
    np.testing.assert_array_equal(rebuilt, tokens)
    np.testing.assert_array_equal(x[1:, 0].numpy(), y[:-1, -1].numpy())
    partial = (n_tokens - 1) % seq_len
    assert blocks.n_full_blocks == len(blocks) - (partial != 0)
    if partial:
        assert (y[-1, partial:] == data.IGNORE_INDEX).all() and (x[-1, partial + 1 :] == 0).all()


def test_manifest_records_sizes_checksums_and_meta(tmp_path):
    tokens = np.arange(1, 101, dtype=np.int32)
    manifest = write_shards(tokens, tmp_path, 8, n_words=42, rows_per_shard=4, meta={"vocab_size": 300})
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert (manifest["seq_len"], manifest["n_tokens"], manifest["n_words"], manifest["vocab_size"]) == (8, 100, 42, 300)
    assert [shard["rows"] for shard in manifest["shards"]] == [4, 4, 4, 1]
    for shard in manifest["shards"]:
        raw = (tmp_path / shard["name"]).read_bytes()
        assert shard["bytes"] == len(raw) and shard["sha256"] == hashlib.sha256(raw).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + [s["name"] for s in manifest["shards"]]


def test_rewrite_removes_stale_shards(tmp_path):
    write_shards(np.arange(100, dtype=np.int32), tmp_path, 4, n_words=1, rows_per_shard=5)
    manifest = write_shards(np.arange(100, dtype=np.int32), tmp_path, 32, n_words=1, rows_per_shard=5)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [s["name"] for s in manifest["shards"]]
    assert len(TokenBlocks(tmp_path)) == 4


def test_shards_are_arrow_ipc_files_with_the_documented_schema(tmp_path):
    import pyarrow as pa

    write_shards(np.arange(20, dtype=np.int32), tmp_path, 4, n_words=1)
    with pa.memory_map(str(tmp_path / "shard-00000.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.schema.field("tokens").type == pa.list_(pa.int32(), 5)
    assert table.schema.field("n_valid").type == pa.int32()
    assert table.column("n_valid").to_pylist() == [5, 5, 5, 5, 4]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(np.arange(1, 300, dtype=np.int32), tmp_path / "shards", 16, n_words=10, rows_per_shard=8)
    return tmp_path / "shards"


def test_truncated_shard_is_named(shard_dir):
    path = shard_dir / "shard-00001.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    for verify in (True, False):
        with pytest.raises(DataError, match=r"shard-00001\.arrow.*truncated.*prepare shards"):
            TokenBlocks(shard_dir, verify=verify)


def test_corrupted_shard_is_named(shard_dir):
    path = shard_dir / "shard-00000.arrow"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 : len(raw) // 2 + 8])
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"shard-00000\.arrow.*sha256.*snakemake"):
        TokenBlocks(shard_dir)


def test_missing_manifest_is_named(shard_dir):
    (shard_dir / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json not found"):
        TokenBlocks(shard_dir)


def test_batch_shapes_and_dtypes(shard_dir):
    blocks = TokenBlocks(shard_dir)
    assert (blocks.seq_len, blocks.n_tokens, blocks.n_words) == (16, 299, 10)
    indices = np.array([len(blocks) - 1, 0, 9, 9])  # across shards, repeated, unordered
    x, y = blocks.batch(indices)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[2], x[3]) and x[1, 0] == 1
    assert (y[1:] != data.IGNORE_INDEX).all() and (y[0] == data.IGNORE_INDEX).any()
    with pytest.raises(IndexError):
        blocks.batch(np.array([len(blocks)]))


# --------------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="gtmoe")
    add_prepare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_prepare_end_to_end(wikitext_dir, tmp_path):
    corpus, tok_path = tmp_path / "corpus", tmp_path / "tokenizer.json"
    run_cli(
        "prepare", "corpus", "--source", "local", "--local-dir", str(wikitext_dir), "--out", str(corpus), "--no-verify"
    )
    run_cli("prepare", "tokenizer", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tok_path))
    tokenizer = data.Tokenizer.from_file(str(tok_path))
    for split in SPLITS:
        out = tmp_path / "shards" / split
        run_cli(
            "prepare",
            "shards",
            "--corpus",
            str(corpus),
            "--tokenizer",
            str(tok_path),
            "--split",
            split,
            "--seq-len",
            "32",
            "--out",
            str(out),
        )
        blocks = TokenBlocks(out)
        lines = read_corpus_split(corpus, split)
        assert blocks.n_tokens == len(encode_split(tokenizer, lines))
        assert blocks.n_words == count_words(lines)
        assert blocks.manifest["vocab_size"] == tokenizer.get_vocab_size()
        assert blocks.manifest["tokenizer_sha256"] == hashlib.sha256(tok_path.read_bytes()).hexdigest()
    assert json.loads((corpus / "corpus.json").read_text())["train"]["source"].startswith("local:")


def test_cli_missing_tokenizer_is_a_data_error(wikitext_dir, tmp_path):
    run_cli("prepare", "corpus", "--local-dir", str(wikitext_dir), "--out", str(tmp_path), "--no-verify")
    with pytest.raises(DataError, match="missing.json not found.*prepare tokenizer"):
        run_cli(
            "prepare",
            "shards",
            "--corpus",
            str(tmp_path),
            "--tokenizer",
            str(tmp_path / "missing.json"),
            "--split",
            "test",
            "--seq-len",
            "8",
            "--out",
            str(tmp_path / "shards"),
        )


def test_cli_every_option_has_help():
    commands = argparse.ArgumentParser(prog="gtmoe").add_subparsers(dest="command")
    add_prepare_parser(commands)
    prepare = commands.choices["prepare"]
    (stages,) = [a for a in prepare._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(stages.choices) == {"corpus", "tokenizer", "shards"}
    for stage in stages.choices.values():
        options = [a for a in stage._actions if a.option_strings and a.dest != "help"]
        assert options and all(a.help for a in options), stage.prog


# --------------------------------------------------------------------------- corpus variants (WikiText-103)

WT103 = data.CORPORA["wikitext-103"]


def published_like(directory: Path) -> dict:
    """Checksums and counts of stand-in files, computed independently of gtmoe (hashlib, str.split)."""
    checksums, lines, words = {}, {}, {}
    for split, name in LOCAL_FILES.items():
        raw = (directory / name).read_bytes()
        text = raw.decode()
        checksums[split] = ("sha1", hashlib.sha1(raw).hexdigest())
        lines[split] = text.count("\n")
        words[split] = len(text.split()) + text.count("\n")  # words + one end-of-line per line
    return {"checksums": checksums, "lines": lines, "words": words}


def run_main(*argv: str) -> int:
    from gtmoe.__main__ import main

    return main(list(argv))


def test_corpus_specs_name_their_hub_config_and_published_counts():
    assert set(data.CORPORA) == {"wikitext-2", "wikitext-103"}
    assert data.CORPORA["wikitext-2"].hub_config == "wikitext-2-v1"
    assert WT103.hub_config == "wikitext-103-v1"
    assert WT103.local_files == {
        "train": "wiki.train.tokens",
        "validation": "wiki.valid.tokens",
        "test": "wiki.test.tokens",
    }
    # Merity et al. 2016, Table 1; the line counts are the hub's num_examples.
    assert WT103.words == {"train": 103_227_021, "validation": 217_646, "test": 245_569}
    assert WT103.lines == {"train": 1_801_350, "validation": 3_760, "test": 4_358}
    assert all(algorithm == "sha1" and len(digest) == 40 for algorithm, digest in WT103.checksums.values())
    # The WikiText-2 spec keeps SOURCES.md's sha256 (the files of the existing study).
    assert {split: digest for split, (_, digest) in data.CORPORA["wikitext-2"].checksums.items()} == data.LOCAL_SHA256


@needs_real
def test_wikitext2_cli_checks_counts_and_records_the_original_sha256(tmp_path):
    assert run_main("prepare", "corpus", "--local-dir", str(REAL_DIR), "--out", str(tmp_path)) == 0
    meta = json.loads((tmp_path / "corpus.json").read_text())
    for split, name in LOCAL_FILES.items():
        assert meta[split]["corpus"] == "wikitext-2"
        assert (
            meta[split]["local_sha256"]
            == data.LOCAL_SHA256[split]
            == hashlib.sha256((REAL_DIR / name).read_bytes()).hexdigest()
        )
        assert (meta[split]["lines"], meta[split]["words"]) == (
            data.CORPORA["wikitext-2"].lines[split],
            data.CORPORA["wikitext-2"].words[split],
        )


def test_wikitext103_local_copy_is_verified_through_the_cli(tmp_path, monkeypatch):
    """The path a WikiText-103 config takes, on a stand-in whose published values are patched in."""
    local = write_wikitext(
        tmp_path / "wikitext-103", {split: ARTICLE_LINES * (3 + i) for i, split in enumerate(SPLITS)}
    )
    monkeypatch.setitem(data.CORPORA, "wikitext-103", dataclasses.replace(WT103, **published_like(local)))

    def no_hub(*args, **kwargs):
        raise AssertionError("a complete local copy must not touch the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    out = tmp_path / "corpus"
    assert run_main("prepare", "corpus", "--corpus", "wikitext-103", "--local-dir", str(local), "--out", str(out)) == 0
    meta = json.loads((out / "corpus.json").read_text())
    expected = published_like(local)
    for split, name in LOCAL_FILES.items():
        raw = (local / name).read_bytes()
        assert meta[split]["corpus"] == "wikitext-103"
        assert meta[split]["source"] == f"local:{(local / name).resolve()}"
        assert meta[split]["local_sha256"] == hashlib.sha256(raw).hexdigest()
        assert (meta[split]["lines"], meta[split]["words"]) == (expected["lines"][split], expected["words"][split])
        # Blank lines " " are written as "" (the hub's rows), non-blank lines verbatim.
        assert read_corpus_split(out, split) == [line if line.strip() else "" for line in raw.decode().split("\n")[:-1]]


def test_wikitext103_without_a_local_copy_asks_the_hub_for_wikitext_103_v1(tmp_path, monkeypatch, capsys):
    rows = {split: [line + "\n" if line.strip() else "" for line in ARTICLE_LINES * 2] for split in SPLITS}
    counts = {
        "lines": {s: len(r) for s, r in rows.items()},
        "words": {s: sum(len(row.split()) for row in r) + len(r) for s, r in rows.items()},
    }
    monkeypatch.setitem(data.CORPORA, "wikitext-103", dataclasses.replace(WT103, **counts))
    calls = []

    def fake_hub(*args, **kwargs):
        calls.append(args)
        return {split: {"text": split_rows} for split, split_rows in rows.items()}

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    out = tmp_path / "corpus"
    missing = tmp_path / "no-wikitext-103-here"
    assert (
        run_main("prepare", "corpus", "--corpus", "wikitext-103", "--local-dir", str(missing), "--out", str(out)) == 0
    )
    assert calls == [(HUB_ID, "wikitext-103-v1")]
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["train"]["source"] == f"hub:{HUB_ID}/wikitext-103-v1:train"
    assert "local_sha256" not in meta["train"] and meta["train"]["corpus"] == "wikitext-103"

    # The published counts are checked on the hub's rows too: one missing row is named.
    rows["validation"] = rows["validation"][:-1]
    assert run_main("prepare", "corpus", "--corpus", "wikitext-103", "--source", "hub", "--out", str(out)) == 2
    error = capsys.readouterr().err
    assert "'validation'" in error and "wikitext-103-v1" in error and f"{len(ARTICLE_LINES) * 2:,}" in error


def test_wikitext103_checksum_mismatch_names_the_algorithm_and_where_it_was_published(tmp_path):
    local = write_wikitext(tmp_path, {split: ARTICLE_LINES for split in SPLITS})
    with pytest.raises(DataError, match=r"wiki.train.tokens: sha1 [0-9a-f]{40} .*b7497e2d.*wikitext-103.*gluon"):
        load_corpus(local, source="local", corpus="wikitext-103")
    # The WikiText-2 files are not WikiText-103 ones.
    if all((REAL_DIR / name).is_file() for name in LOCAL_FILES.values()):
        with pytest.raises(DataError, match="wiki.train.tokens: sha1"):
            load_corpus(REAL_DIR, source="local", corpus="wikitext-103")


def test_no_verify_skips_checksums_and_counts(tmp_path, monkeypatch):
    local = write_wikitext(tmp_path / "wt", {split: ARTICLE_LINES for split in SPLITS})
    assert (
        run_main(
            "prepare",
            "corpus",
            "--corpus",
            "wikitext-103",
            "--local-dir",
            str(local),
            "--out",
            str(tmp_path / "c"),
            "--no-verify",
        )
        == 0
    )
    assert json.loads((tmp_path / "c" / "corpus.json").read_text())["test"]["corpus"] == "wikitext-103"


def test_unknown_corpus_is_named_by_loader_study_and_parse_time_check(tmp_path):
    from gtmoe.config import ConfigError
    from gtmoe.study import Study, corpus_problem

    with pytest.raises(DataError, match="unknown corpus 'wikitext-4'.*wikitext-2, wikitext-103"):
        load_corpus(tmp_path, corpus="wikitext-4")
    assert "'data.corpus' = 'wikitext-4'" in corpus_problem({"corpus": "wikitext-4", "source": "hub"})
    config = {
        "data": {"corpus": "wikitext-4", "source": "hub", "vocab_size": 512, "seq_len": 32},
        "model": {"vocab_size": 512, "max_seq_len": 32},
        "seeds": [0],
        "variants": [{"name": "topk", "router": "topk"}],
    }
    with pytest.raises(ConfigError, match="data.corpus.*wikitext-4"):
        Study.from_config(config)


def test_wikitext103_local_dir_missing_files_is_named_for_source_local(tmp_path):
    from gtmoe.study import corpus_problem

    data_cfg = {"corpus": "wikitext-103", "source": "local", "local_dir": str(tmp_path)}
    assert "set data.source: hub to download wikitext-103" in corpus_problem(data_cfg)
    assert corpus_problem({**data_cfg, "source": "auto"}) is None  # the corpus job falls back to the hub


# --------------------------------------------------------------------------- streaming encode


def test_encode_split_in_batches_equals_encoding_line_by_line(tokenizer, monkeypatch):
    lines = ARTICLE_LINES * 7
    monkeypatch.setattr("gtmoe.data.tokenizer._ENCODE_LINES", 5)  # batch edges fall inside articles and on titles
    eot_id = tokenizer.token_to_id(EOT)
    expected: list[int] = []
    seen_title = False
    for line in lines:  # brute force: one line at a time, end-of-text before every title but the first
        if line in (" = Alpha Beta = ", " = Gamma = "):
            expected.extend([eot_id] if seen_title else [])
            seen_title = True
        expected.extend(tokenizer.encode(line + "\n", add_special_tokens=False).ids)
    np.testing.assert_array_equal(encode_split(tokenizer, lines), np.asarray(expected, dtype=np.int32))


def test_encode_split_memory_grows_with_the_int32_result_not_a_python_list(tokenizer, monkeypatch):
    import tracemalloc

    monkeypatch.setattr("gtmoe.data.tokenizer._ENCODE_LINES", 256)
    lines = ARTICLE_LINES * 4000  # 64k lines, ~700k tokens
    tracemalloc.start()
    try:
        tokens = encode_split(tokenizer, lines)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # int32 pieces + their concatenation: 2 x 4 bytes per token plus one small batch (measured ~9.7).
    # One Python list of every id costs 8 bytes per token in pointers plus 28 per int object above
    # 256 (the earlier implementation peaked at ~78 bytes per token here).
    assert peak < 16 * len(tokens), (peak, len(tokens))
