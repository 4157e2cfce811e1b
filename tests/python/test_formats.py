"""`millrace inspect` against shards written by independent writers (numpy, megatron-core)."""

from __future__ import annotations

import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from megatron_ref import NumpyTensor
from writers import (HEADER_SIZE, MEGATRON_DTYPES, MegatronShard, append, patch, raw_documents,
                     truncate, write_groups, write_megatron, write_raw)

# ---------------------------------------------------------------------------------------------
# expectations, computed here with numpy / plain Python only


@dataclass
class Expect:
    name: str  # file name (raw) or prefix name (megatron) of the shard
    fmt: str
    dtype: str
    docs: list  # token array per document
    sequences: int
    nbytes: int
    groups: list | None = None


def megatron_expect(shard: MegatronShard, groups=None) -> Expect:
    return Expect(shard.prefix.name, "megatron", shard.dtype.name, shard.docs, shard.sequences,
                  shard.bin_path.stat().st_size, groups)


def raw_expect(path: Path, tokens, eos, dtype, groups=None) -> Expect:
    docs = raw_documents(tokens, eos)
    return Expect(path.name, "raw", dtype, docs, len(docs), path.stat().st_size, groups)


def n_groups(ids) -> int:
    return sum(1 for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1])


def expected_stats(lengths):
    s = np.sort(np.asarray(lengths, dtype=np.int64))
    n = len(s)
    rank = lambda q: int(s[-(-q * n // 100) - 1])  # nearest rank: sorted[ceil(q/100*n) - 1]
    stats = {"min": int(s[0]), "p50": rank(50), "p90": rank(90), "p99": rank(99),
             "max": int(s[-1]), "mean": float(s.mean())}
    los = np.where(s == 0, 0, 2 ** np.floor(np.log2(np.maximum(s, 1))).astype(np.int64))
    hist = [{"lo": int(lo), "hi": 1 if lo == 0 else int(2 * lo), "count": c}
            for lo, c in sorted(Counter(los.tolist()).items())]
    return stats, hist


def check_stats(got: dict, lengths) -> None:
    stats, hist = expected_stats(lengths)
    assert set(got["lengths"]) == set(stats)
    for key in ("min", "p50", "p90", "p99", "max"):
        assert got["lengths"][key] == stats[key], key
    assert got["lengths"]["mean"] == pytest.approx(stats["mean"], rel=1e-9)
    assert got["histogram"] == hist


def same_shard(reported: str, exp: Expect) -> bool:
    return Path(reported).name in {exp.name, f"{exp.name}.bin", f"{exp.name}.idx"}


def check_inspect(millrace, args, shards: list[Expect]) -> dict:
    out = millrace.json("inspect", "--json", *args)
    assert set(out) == {"shards", "total"}
    assert len(out["shards"]) == len(shards)
    for got, exp in zip(out["shards"], shards):
        lengths = [len(d) for d in exp.docs]
        assert same_shard(got["path"], exp), (got["path"], exp.name)
        assert (got["format"], got["dtype"]) == (exp.fmt, exp.dtype)
        assert got["documents"] == len(exp.docs)
        assert got["sequences"] == exp.sequences
        assert got["tokens"] == sum(lengths)
        assert got["bytes"] == exp.nbytes
        assert got["groups"] == (None if exp.groups is None else n_groups(exp.groups))
        check_stats(got, lengths)
    total, lengths = out["total"], [len(d) for s in shards for d in s.docs]
    assert total["shards"] == len(shards)
    assert total["documents"] == len(lengths)
    assert total["sequences"] == sum(s.sequences for s in shards)
    assert total["tokens"] == sum(lengths)
    assert total["bytes"] == sum(s.nbytes for s in shards)
    counts = [n_groups(s.groups) for s in shards if s.groups is not None]
    assert total["groups"] == (sum(counts) if counts else None)
    check_stats(total, lengths)
    return out


def assert_tokens(got: list, exp: np.ndarray) -> None:
    assert len(got) == len(exp)
    if exp.dtype.kind == "f":
        assert all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in got)
        np.testing.assert_array_equal(np.array(got, dtype=np.float64), exp.astype(np.float64))
    else:
        assert all(type(t) is int for t in got)
        assert got == exp.tolist()


def check_docs(millrace, args, shards: list[Expect], lo=0, hi=None, doc_arg=None) -> None:
    flat = [(s, local) for s in shards for local in range(len(s.docs))]
    hi = len(flat) if hi is None else hi
    out = millrace.json("inspect", "--json", "--doc", doc_arg or f"{lo}..{hi}", *args)
    assert set(out) == {"documents"}
    assert [d["index"] for d in out["documents"]] == list(range(lo, hi))
    for d in out["documents"]:
        exp, local = flat[d["index"]]
        assert same_shard(d["shard"], exp), (d["shard"], exp.name)
        assert d["local_index"] == local
        assert d["group"] == (None if exp.groups is None else int(exp.groups[local]))
        assert_tokens(d["tokens"], exp.docs[local])


# ---------------------------------------------------------------------------------------------
# corpora


def random_tokens(rng, dtype, n):
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.integers(-1000, 1001, n).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=n, dtype=dt, endpoint=True)


def make_docs(dtype, seed, n_docs=20, long_doc=7):
    """Documents as lists of sequences; doc ``long_doc`` has 5000 tokens in three sequences."""
    rng = np.random.default_rng(seed)
    docs = []
    for d in range(n_docs):
        if d == 0:
            lens = [5, 3]
        elif d == long_doc:
            lens = [3000, 1999, 1]
        else:
            lens = rng.integers(1, 40, size=rng.integers(1, 4)).tolist()
        docs.append([random_tokens(rng, dtype, n) for n in lens])
    dt = np.dtype(dtype)
    lo, hi = (-1000, 1000) if dt.kind == "f" else (np.iinfo(dt).min, np.iinfo(dt).max)
    docs[0][0][:2] = [lo, hi]
    return docs


def flat_docs(docs):
    return [np.concatenate(d) for d in docs]


# ---------------------------------------------------------------------------------------------
# 1. megatron-core's IndexedDatasetBuilder


def build_with_megatron(megatron, prefix, docs, dtype):
    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.dtype(dtype).type)
    for i, doc in enumerate(docs):
        if i % 2:
            builder.add_document(np.concatenate(doc), [len(s) for s in doc])
        else:
            for seq in doc:
                builder.add_item(NumpyTensor(seq))
            builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("dtype", MEGATRON_DTYPES)
def test_megatron_core_writer_roundtrip(tmp_path, millrace, megatron, dtype):
    docs = make_docs(dtype, seed=1)
    prefix = tmp_path / f"mcore_{dtype}"
    build_with_megatron(megatron, prefix, docs, dtype)
    nbytes = Path(f"{prefix}.bin").stat().st_size
    assert nbytes == sum(len(d) for d in flat_docs(docs)) * np.dtype(dtype).itemsize
    exp = Expect(prefix.name, "megatron", dtype, flat_docs(docs), sum(map(len, docs)), nbytes)
    out = check_inspect(millrace, [prefix], [exp])
    assert out["total"]["lengths"]["max"] == 5000
    check_docs(millrace, [prefix], [exp])


@pytest.mark.parametrize("dtype", MEGATRON_DTYPES)
def test_numpy_writer_matches_megatron_core_bytes(tmp_path, megatron, dtype):
    """The numpy writer and megatron-core agree byte for byte, so both writers test the same
    format."""
    docs = make_docs(dtype, seed=2, n_docs=6, long_doc=3)
    build_with_megatron(megatron, tmp_path / "m", docs, dtype)
    write_megatron(tmp_path / "n", docs, dtype)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"m.{ext}").read_bytes() == (tmp_path / f"n.{ext}").read_bytes(), ext


# ---------------------------------------------------------------------------------------------
# 2. numpy writer


@pytest.mark.parametrize("dtype", MEGATRON_DTYPES)
def test_numpy_writer_roundtrip(tmp_path, millrace, dtype):
    shard = write_megatron(tmp_path / f"np_{dtype}", make_docs(dtype, seed=3), dtype)
    assert shard.sequences > 20  # sentence-split documents
    exp = megatron_expect(shard)
    check_inspect(millrace, [shard.prefix], [exp])
    check_docs(millrace, [shard.prefix], [exp])
    check_docs(millrace, [shard.prefix], [exp], 7, 8, doc_arg="7")  # the 5000-token document


def test_prefix_bin_and_idx_paths_are_equivalent(tmp_path, millrace):
    shard = write_megatron(tmp_path / "forms", make_docs("uint16", seed=4, n_docs=5), "uint16")
    exp = megatron_expect(shard)
    for path in (shard.prefix, shard.bin_path, shard.idx_path):
        check_inspect(millrace, [path], [exp])
        check_docs(millrace, [path], [exp], 1, 4)


def test_zero_length_documents(tmp_path, millrace):
    rng = np.random.default_rng(5)
    seq = lambda n: rng.integers(0, 65535, n).astype(np.uint16)
    empty = np.zeros(0, np.uint16)
    docs = [[seq(3)], [], [empty], [seq(2), empty, seq(4)], [seq(1)], [], [empty]]
    shard = write_megatron(tmp_path / "zeros", docs, np.uint16)
    exp = megatron_expect(shard)
    assert [len(d) for d in exp.docs] == [3, 0, 0, 6, 1, 0, 0] and exp.sequences == 7
    out = check_inspect(millrace, [shard.prefix], [exp])
    assert out["shards"][0]["histogram"][0] == {"lo": 0, "hi": 1, "count": 4}
    check_docs(millrace, [shard.prefix], [exp])


def test_multimodal_modes_array_is_accepted(tmp_path, millrace):
    shard = write_megatron(tmp_path / "mm", make_docs("int32", seed=6, n_docs=6, long_doc=2),
                           "int32", modes=True)
    assert shard.idx_path.stat().st_size == shard.offsets()["end"] + shard.sequences
    exp = megatron_expect(shard)
    check_inspect(millrace, [shard.prefix], [exp])
    check_docs(millrace, [shard.prefix], [exp])


def test_directory_of_shards_global_indexing(tmp_path, millrace):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shards = {}
    for name, seed, n in (("shard_c", 7, 4), ("shard_a", 8, 7), ("shard_b", 9, 5)):  # unsorted
        docs = make_docs("uint16", seed, n_docs=n, long_doc=None)
        shards[name] = megatron_expect(write_megatron(corpus / name, docs, "uint16"))
    ordered = [shards[k] for k in sorted(shards)]  # a (0..7), b (7..12), c (12..16)
    check_inspect(millrace, [corpus], ordered)
    check_docs(millrace, [corpus], ordered)
    check_docs(millrace, [corpus], ordered, 5, 9)  # spans shard_a -> shard_b
    check_docs(millrace, [corpus], ordered, 13, 14, doc_arg="13")
    # explicit PATHs keep the order given
    given = [shards["shard_c"], shards["shard_a"]]
    paths = [corpus / "shard_c", corpus / "shard_a"]
    check_inspect(millrace, paths, given)
    check_docs(millrace, paths, given)
    # out-of-range documents are errors
    for doc in ("16", "15..17", "20..22"):
        millrace.fail("inspect", "--json", "--doc", doc, corpus)


@pytest.mark.parametrize("lengths, stats, hist", [
    (list(range(1, 101)),
     {"min": 1, "p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5},
     [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32), (64, 37)]),
    ([7, 1, 8, 3, 1024, 2, 1023],
     {"min": 1, "p50": 7, "p90": 1024, "p99": 1024, "max": 1024, "mean": 2068 / 7},
     [(1, 1), (2, 2), (4, 1), (8, 1), (512, 1), (1024, 1)]),
    ([42], {"min": 42, "p50": 42, "p90": 42, "p99": 42, "max": 42, "mean": 42.0}, [(32, 1)]),
], ids=["1-100", "powers-of-two", "single"])
def test_length_percentiles_and_histogram(tmp_path, millrace, lengths, stats, hist):
    # the independent numpy computation agrees with hand-computed answers ...
    got_stats, got_hist = expected_stats(lengths)
    assert got_stats == pytest.approx(stats)
    assert [(h["lo"], h["count"]) for h in got_hist] == hist
    # ... and with millrace (check_inspect compares against the numpy computation)
    rng = np.random.default_rng(10)
    docs = [rng.integers(0, 60000, n).astype(np.uint16) for n in rng.permutation(lengths)]
    shard = write_megatron(tmp_path / "stats", docs, np.uint16)
    out = check_inspect(millrace, [shard.prefix], [megatron_expect(shard)])
    assert out["shards"][0]["lengths"]["p90"] == stats["p90"]


# ---------------------------------------------------------------------------------------------
# 3. raw token files


def raw_corpus(rng, eos, hi, n_docs, tail):
    parts = []
    for i in range(n_docs):
        n = 3000 if i == 2 else int(rng.integers(0, 60))
        body = rng.integers(1, hi, size=n, endpoint=True)
        body[body == eos] = eos + 1
        parts += [body, [eos]]
    if tail:
        parts.append(rng.integers(eos + 1, hi, size=17, endpoint=True))
    return np.concatenate(parts)


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "eos-terminated"])
@pytest.mark.parametrize("dtype, eos, hi", [("uint16", 0, 2**16 - 1), ("uint32", 100257, 2**32 - 1)])
def test_raw_tokens_and_cache_invalidation(tmp_path, millrace, dtype, eos, hi, tail):
    rng = np.random.default_rng(11)
    path, cache = tmp_path / "corpus.tok", tmp_path / "cache"
    cache.mkdir()
    args = ["--format", "raw", "--dtype", dtype, "--eos", eos, "--cache-dir", cache, path]
    tokens = write_raw(path, raw_corpus(rng, eos, hi, 25, tail), dtype)
    exp = raw_expect(path, tokens, eos, dtype)
    assert len(exp.docs) == 25 + tail
    check_inspect(millrace, args, [exp])
    check_docs(millrace, args, [exp])
    assert any(cache.iterdir()), "the boundary index was not cached"
    check_inspect(millrace, args, [exp])  # served from the cache

    # append tokens: size and mtime change -> the cached index must be rebuilt
    mtime = path.stat().st_mtime
    extra = raw_corpus(rng, eos, hi, 4, True)
    append(path, extra.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    os.utime(path, (mtime + 5, mtime + 5))
    tokens = np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<"))
    exp = raw_expect(path, tokens, eos, dtype)
    assert len(exp.docs) == 25 + 4 + 1
    check_inspect(millrace, args, [exp])
    check_docs(millrace, args, [exp], 20, len(exp.docs))

    # same size, new content and mtime: a token becomes EOS -> one more document
    i = int(np.flatnonzero(tokens != eos)[5])
    patch(path, i * tokens.itemsize, np.array([eos], tokens.dtype).tobytes())
    os.utime(path, (mtime + 10, mtime + 10))
    tokens = np.fromfile(path, dtype=tokens.dtype)
    exp = raw_expect(path, tokens, eos, dtype)
    assert len(exp.docs) == 25 + 4 + 2
    check_inspect(millrace, args, [exp])
    check_docs(millrace, args, [exp], 0, 3)


# ---------------------------------------------------------------------------------------------
# 4. group sidecars


@pytest.mark.parametrize("gdtype", ["<u8", "<i8"])
def test_group_sidecar(tmp_path, millrace, gdtype):
    corpus = tmp_path / "grouped"
    corpus.mkdir()
    big = 2**63 + 7 if gdtype == "<u8" else 2**62 + 7
    ids = [5, 5, 5, 2, 2, big, big, 0, 0, 0]  # contiguous runs, ids not sorted
    a = write_megatron(corpus / "part_a", make_docs("int32", 12, n_docs=10, long_doc=None),
                       "int32")
    assert np.load(write_groups(a.prefix, ids, gdtype)).dtype.str == gdtype
    b = write_megatron(corpus / "part_b", make_docs("int32", 13, n_docs=4, long_doc=None),
                       "int32")
    ea, eb = megatron_expect(a, ids), megatron_expect(b)
    out = check_inspect(millrace, [a.prefix], [ea])
    assert out["shards"][0]["groups"] == 4
    check_docs(millrace, [a.prefix], [ea])
    out = check_inspect(millrace, [corpus], [ea, eb])  # one shard without a sidecar
    assert out["total"]["groups"] == 4 and out["shards"][1]["groups"] is None
    check_docs(millrace, [corpus], [ea, eb])

    # a raw file's sidecar is <path without extension>.groups.npy
    raw, cache = tmp_path / "rawgrp.tok", tmp_path / "cache"
    cache.mkdir()
    tokens = write_raw(raw, raw_corpus(np.random.default_rng(14), 0, 65535, 5, False), "uint16")
    raw_ids = [9, 9, 1, 1, 1]
    write_groups(tmp_path / "rawgrp", raw_ids, gdtype)
    args = ["--format", "raw", "--dtype", "uint16", "--eos", 0, "--cache-dir", cache, raw]
    exp = raw_expect(raw, tokens, 0, "uint16", raw_ids)
    out = check_inspect(millrace, args, [exp])
    assert out["total"]["groups"] == 2
    check_docs(millrace, args, [exp])


# ---------------------------------------------------------------------------------------------
# 5. corrupt fixtures

BASE_SEQUENCES = [[5, 3], [4], [6, 2, 1], [7], [2, 2], [3]]  # 10 sequences, 6 documents


def base_shard(tmp_path) -> MegatronShard:
    rng = np.random.default_rng(15)
    docs = [[rng.integers(0, 50000, n).astype(np.int32) for n in d] for d in BASE_SEQUENCES]
    return write_megatron(tmp_path / "bad_shard", docs, np.int32)


def test_corruption_base_shard_is_valid(tmp_path, millrace):
    shard = base_shard(tmp_path)
    assert shard.sequences == 10 and shard.document_indices.tolist() == [0, 2, 3, 6, 7, 9, 10]
    check_inspect(millrace, [shard.prefix], [megatron_expect(shard)])


def _idx_field(field, index, fmt, value):
    """An edit writing `value` into element `index` of an .idx field."""
    size = struct.calcsize(fmt)
    return lambda s: patch(s.idx_path, s.offsets()[field] + index * size,
                           struct.pack(fmt, value(s) if callable(value) else value))


def _megatron_case(edit):
    def build(tmp_path):
        shard = base_shard(tmp_path)
        edit(shard)
        return [shard.prefix], shard.prefix
    return build


def _empty_megatron(tmp_path):
    shard = write_megatron(tmp_path / "empty_shard", [], np.int32)
    assert shard.idx_path.stat().st_size == HEADER_SIZE + 8 and shard.bin_path.stat().st_size == 0
    return [shard.prefix], shard.prefix


def _raw_case(data: bytes):
    def build(tmp_path):
        path = tmp_path / "bad_raw.tok"
        path.write_bytes(data)
        return ["--format", "raw", "--dtype", "uint16", "--eos", 0, "--cache-dir", tmp_path, path], path
    return build


def _bad_shard_in_directory(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_megatron(corpus / "a_good", make_docs("int32", 16, n_docs=3, long_doc=None), "int32")
    bad = base_shard(corpus)
    patch(bad.idx_path, 17, b"\x09")
    return [corpus], bad.prefix


CORRUPTIONS = {
    "magic": (_megatron_case(lambda s: patch(s.idx_path, 0, b"NOTMAGIC!")), ["magic"]),
    "version": (_megatron_case(_idx_field("version", 0, "<Q", 2)), ["version"]),
    "dtype-code-9": (_megatron_case(_idx_field("dtype", 0, "<B", 9)), ["dtype code"]),
    "dtype-code-0": (_megatron_case(_idx_field("dtype", 0, "<B", 0)), ["dtype code"]),
    "truncated-header": (_megatron_case(lambda s: truncate(s.idx_path, 30)), ["truncated"]),
    "truncated-lengths": (_megatron_case(lambda s: truncate(s.idx_path, HEADER_SIZE + 9)),
                          ["truncated"]),
    "truncated-document-indices": (
        _megatron_case(lambda s: truncate(s.idx_path, s.offsets()["end"] - 3)), ["truncated"]),
    "sequence-count-too-large": (_megatron_case(_idx_field("sequence_count", 0, "<Q", 1000)),
                                 ["truncated"]),
    "bin-shorter": (_megatron_case(lambda s: truncate(s.bin_path, s.bin_path.stat().st_size - 4)),
                    ["bin"]),
    "bin-longer": (_megatron_case(lambda s: append(s.bin_path, bytes(4))), ["bin"]),
    "pointer-out-of-range": (_megatron_case(_idx_field("pointers", 3, "<q", 10**12)),
                             ["pointer", "sequence 3"]),
    "pointer-gap": (_megatron_case(
        _idx_field("pointers", 3, "<q", lambda s: int(s.sequence_pointers[3]) + 4)),
        ["pointer", "sequence 3"]),
    "pointer-overlap": (_megatron_case(
        _idx_field("pointers", 3, "<q", lambda s: int(s.sequence_pointers[3]) - 4)),
        ["pointer", "sequence 3"]),
    "negative-length": (_megatron_case(_idx_field("lengths", 2, "<i", -1)), ["length"]),
    "document-first-nonzero": (_megatron_case(_idx_field("document_indices", 0, "<q", 1)),
                               ["document"]),
    "document-decreasing": (_megatron_case(_idx_field("document_indices", 2, "<q", 7)),
                            ["document"]),
    "document-end-short": (_megatron_case(_idx_field("document_indices", 6, "<q", 9)),
                           ["document"]),
    "document-end-long": (_megatron_case(_idx_field("document_indices", 6, "<q", 11)),
                          ["document"]),
    "bin-not-multiple": (_megatron_case(lambda s: append(s.bin_path, b"\x01")), ["multiple"]),
    "groups-short": (_megatron_case(lambda s: write_groups(s.prefix, [0] * 5, "<u8")),
                     ["groups"]),
    "groups-long": (_megatron_case(lambda s: write_groups(s.prefix, [0] * 7, "<i8")), ["groups"]),
    "groups-not-contiguous": (
        _megatron_case(lambda s: write_groups(s.prefix, [1, 1, 2, 2, 1, 3], "<u8")),
        ["contiguous"]),
    "empty-megatron": (_empty_megatron, ["empty"]),
    "raw-not-multiple": (_raw_case(b"\x01\x00\x02\x00\x03"), ["multiple"]),
    "raw-empty": (_raw_case(b""), ["empty"]),
    "bad-shard-in-directory": (_bad_shard_in_directory, ["dtype code"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_fixture_is_rejected(tmp_path, millrace, case):
    build, keywords = CORRUPTIONS[case]
    args, bad_path = build(tmp_path)
    for mode in ([], ["--json"]):
        stderr = millrace.fail("inspect", *mode, *args)
        assert str(bad_path) in stderr, f"stderr does not name {bad_path}:\n{stderr}"
        message = re.sub(re.escape(str(tmp_path)) + r"\S*", "<path>", stderr).lower()
        for keyword in keywords:  # outside the paths (".bin", ".groups.npy" would match)
            assert keyword in message, f"{keyword!r} not in stderr:\n{stderr}"
