"""Independent fixture writers for the millrace tests.

Everything here is written from the Megatron-LM ``.idx`` layout description with numpy and
struct only; nothing calls millrace. The layout (all little-endian):

    9-byte magic  b"MMIDIDX\\x00\\x00"
    u64 version (= 1)
    u8  dtype code
    u64 sequence_count  (S)
    u64 document_count  (D = number of documents + 1; document_indices starts with 0)
    int32[S] sequence_lengths
    int64[S] sequence_pointers   (byte offsets into .bin)
    int64[D] document_indices    (doc d = sequences [di[d], di[d+1]))
    int8[S]  modes               (optional, multimodal only)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34

DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
MEGATRON_DTYPES = [dt.name for dt in DTYPE_CODES.values()]


@dataclass
class MegatronShard:
    """What `write_megatron` wrote: the paths and the arrays of the index."""

    prefix: Path
    dtype: np.dtype
    docs: list  # one 1-D array per document: its sequences concatenated
    sequence_lengths: np.ndarray
    sequence_pointers: np.ndarray
    document_indices: np.ndarray

    @property
    def bin_path(self) -> Path:
        return Path(f"{self.prefix}.bin")

    @property
    def idx_path(self) -> Path:
        return Path(f"{self.prefix}.idx")

    @property
    def sequences(self) -> int:
        return len(self.sequence_lengths)

    def offsets(self) -> dict:
        return idx_offsets(self.sequences, len(self.document_indices))


def _sequences_of(doc, dtype):
    """A document is one array (one sequence) or a list of arrays (its sequences)."""
    if isinstance(doc, np.ndarray):
        doc = [doc]
    return [np.asarray(seq, dtype=dtype).reshape(-1) for seq in doc]


def write_megatron(prefix, docs, dtype, modes: bool = False) -> MegatronShard:
    """Write ``prefix.bin`` / ``prefix.idx``; ``docs`` is a list of documents (see above)."""
    dtype = np.dtype(dtype)
    le = dtype.newbyteorder("<")
    seqs, doc_indices = [], [0]
    for doc in docs:
        seqs.extend(_sequences_of(doc, dtype))
        doc_indices.append(len(seqs))
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    pointers = np.zeros(len(seqs), dtype=np.int64)
    if len(seqs) > 1:
        pointers[1:] = np.cumsum(lengths[:-1]) * dtype.itemsize
    with open(f"{prefix}.bin", "wb") as f:
        for s in seqs:
            f.write(s.astype(le).tobytes())
    header = MAGIC + struct.pack("<QBQQ", 1, CODE_OF[dtype], len(seqs), len(doc_indices))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(header)
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.array(doc_indices, dtype="<i8").tobytes())
        if modes:
            f.write(np.zeros(len(seqs), dtype="<i1").tobytes())
    doc_tokens = [
        np.concatenate(seqs[a:b]) if b > a else np.zeros(0, dtype)
        for a, b in zip(doc_indices[:-1], doc_indices[1:])
    ]
    return MegatronShard(
        Path(prefix), dtype, doc_tokens, lengths, pointers, np.array(doc_indices, np.int64)
    )


def idx_offsets(sequence_count: int, document_count: int) -> dict:
    """Byte offsets of every field of an .idx file (document_count includes the leading 0)."""
    s, d = sequence_count, document_count
    return {
        "magic": 0,
        "version": 9,
        "dtype": 17,
        "sequence_count": 18,
        "document_count": 26,
        "lengths": HEADER_SIZE,
        "pointers": HEADER_SIZE + 4 * s,
        "document_indices": HEADER_SIZE + 12 * s,
        "end": HEADER_SIZE + 12 * s + 8 * d,
    }


def patch(path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def write_raw(path, tokens, dtype) -> np.ndarray:
    """A flat little-endian token file written with ``ndarray.tofile``."""
    arr = np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<"))
    arr.tofile(path)
    return arr


def raw_documents(tokens, eos: int) -> list:
    """Split a flat token array: each document ends with (and includes) an EOS; tokens after
    the last EOS form a final document without one."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == eos) + 1
    bounds = [0, *ends.tolist()]
    docs = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[-1] < len(tokens):
        docs.append(tokens[bounds[-1]:])
    return docs


def write_groups(prefix, ids, dtype) -> Path:
    """The group sidecar ``<prefix>.groups.npy`` (1-D, one id per document)."""
    path = Path(f"{prefix}.groups.npy")
    np.save(path, np.asarray(ids, dtype=dtype))
    return path
