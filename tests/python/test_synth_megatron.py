"""What `millrace synth` writes, read back by megatron-core's own IndexedDataset reader.

synth's Megatron writer is millrace code; here an independent reader checks it: every
shard opens in megatron-core, its documents equal what `millrace inspect --doc` prints,
each ends with EOD, and the group sidecars are what docs/FORMATS.md specifies.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("vocab,dtype", [(50304, np.uint16), (152064, np.int32)])
def test_synth_shards_read_back_in_megatron_core(tmp_path, millrace, megatron, vocab, dtype):
    out = tmp_path / "corpus"
    summary = millrace.json("synth", "--out", out, "--tokens", "4e5", "--shard-tokens", "1e5",
                            "--vocab", vocab, "--seed", 5, "--json")
    assert summary["tokens"] == 400_000
    total_tokens = 0
    for domain in summary["domains"]:
        docs_in_domain = 0
        for prefix in domain["shards"]:
            ds = megatron.IndexedDataset(prefix)
            assert ds.index.dtype == dtype
            n = len(ds.document_indices) - 1
            docs_in_domain += n
            lengths = ds.sequence_lengths.astype(np.int64)
            total_tokens += int(lengths.sum())
            # One sequence per document, every document ends with EOD (2), ids in range.
            assert list(ds.document_indices) == list(range(n + 1))
            dumped = millrace.json("inspect", "--json", "--doc", f"0..{n}", prefix)["documents"]
            assert len(dumped) == n
            for i in range(n):
                tokens = ds[i]
                assert len(tokens) == lengths[i] >= 1
                assert tokens[-1] == 2
                assert tokens[:-1].min(initial=3) >= 3 and tokens.max() < vocab
                assert dumped[i]["tokens"] == tokens.tolist()
            sidecar = f"{prefix}.groups.npy"
            if domain["name"] in ("code", "books"):
                ids = np.load(sidecar)
                assert ids.dtype == np.uint64 and ids.shape == (n,)
                change = np.flatnonzero(np.diff(ids)) + 1
                runs = np.split(ids, change)
                starts = [int(r[0]) for r in runs]
                assert len(set(starts)) == len(starts), "a group reappears: not contiguous"
                assert [d["group"] for d in dumped] == ids.tolist()
            else:
                assert all(d["group"] is None for d in dumped)
        assert docs_in_domain == domain["documents"]
    assert total_tokens == 400_000
