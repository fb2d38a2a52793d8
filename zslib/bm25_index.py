"""A BM25 index in bm25s's own format, built chunk by chunk so that memory stays bounded at Wikipedia scale.

bm25s's ``BM25.index`` wants every document's token ids at once, as Python lists, and then holds three
arrays of the whole index's size beside them: about 6 GB for 2 million passages, over 60 GB for wiki-18.
``build`` reads the documents once, keeps each chunk's (document, token, count) triples as compact arrays
(on disk when given a folder), then fills the final compressed-column arrays part by part. The scores are
bm25s's (its default Lucene variant, with its own scoring functions), so the index opens with
``bm25s.BM25.load`` and ranks exactly as ``BM25.index`` would (``tests/test_search.py`` checks both).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable


def _parts(chunks: Iterable[list[list[str]]], vocab: dict, parts_dir: Path | None):
    """Each chunk's documents as (doc ids, token ids, counts), sorted by document then token, with the
    documents' lengths; the vocabulary grows in ``vocab`` in order of first appearance."""
    import numpy as np

    n_docs = 0
    for chunk in chunks:
        ids = [[vocab.setdefault(t, len(vocab)) for t in doc] for doc in chunk]
        if not ids:
            continue
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
        docs = np.repeat(np.arange(n_docs, n_docs + len(ids), dtype=np.int64), lengths)
        keys, counts = np.unique(docs << 32 | tokens, return_counts=True)
        part = {"doc": (keys >> 32).astype(np.int32), "token": (keys & 0xFFFFFFFF).astype(np.int32),
                "tf": counts.astype(np.float32), "lengths": lengths}
        if parts_dir is not None:  # kept on disk: only the chunk in hand is in memory
            for name, array in part.items():
                np.save(parts_dir / f"{n_docs}-{name}.npy", array)
            part = {name: parts_dir / f"{n_docs}-{name}.npy" for name in part}
        n_docs += len(ids)
        yield part


def _load(part: dict, name: str):
    import numpy as np

    value = part[name]
    return np.load(value, mmap_mode="r") if isinstance(value, Path) else value


def build(chunks: Iterable[list[list[str]]], parts_dir: str | Path | None = None):
    """A ``bm25s.BM25`` over the documents ``chunks`` yields (lists of token strings, chunk by chunk), or
    None when there are none. ``parts_dir``: a folder for the intermediate arrays (12 bytes per distinct
    token of each document), else they stay in memory."""
    import bm25s
    import numpy as np
    from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer

    parts_dir = Path(parts_dir) if parts_dir is not None else None
    vocab: dict = {}
    parts = list(_parts(chunks, vocab, parts_dir))
    if not parts:
        return None
    n_vocab = len(vocab)
    df = np.zeros(n_vocab, np.int64)
    for part in parts:
        df += np.bincount(_load(part, "token"), minlength=n_vocab)
    lengths = np.concatenate([_load(part, "lengths") for part in parts])
    n_docs, avg_len = len(lengths), lengths.mean()

    index = bm25s.BM25()
    idf_of = _select_idf_scorer(index.idf_method)
    values, inverse = np.unique(df, return_inverse=True)
    idf = np.array([idf_of(int(v), N=n_docs) for v in values], dtype=index.dtype)[inverse]
    tfc_of = _select_tfc_scorer(index.method)

    indptr = np.zeros(n_vocab + 1, np.int64)
    np.cumsum(df, out=indptr[1:])
    data = np.empty(indptr[-1], dtype=index.dtype)
    rows = np.empty(indptr[-1], dtype=index.int_dtype)
    cursor = indptr[:-1].copy()
    for part in parts:  # documents in order, so each column's rows come out ascending, as bm25s sorts them
        doc, token, tf = _load(part, "doc"), _load(part, "token"), _load(part, "tf")
        scores = idf[token] * tfc_of(tf_array=tf, l_d=lengths[doc], l_avg=avg_len, k1=index.k1, b=index.b,
                                     delta=index.delta)
        order = np.argsort(token, kind="stable")
        token_sorted = token[order]
        counts = np.bincount(token_sorted, minlength=n_vocab)
        first = np.cumsum(counts) - counts  # where each token's run starts in this part
        at = cursor[token_sorted] + np.arange(len(order)) - first[token_sorted]
        data[at] = scores[order]
        rows[at] = doc[order]
        cursor += counts
    index.scores = {"data": data, "indices": rows, "indptr": indptr, "num_docs": n_docs}
    if "" not in vocab:  # as BM25.index does: the empty token, which queries with no known word map to
        vocab[""] = n_vocab
    index.vocab_dict = vocab
    index.unique_token_ids_set = set(vocab.values())
    index.nonoccurrence_array = None
    return index
