"""Embedding files into FAISS: training or falling back to Flat, and recall against exact search."""

import faiss
import numpy as np
import pytest

from absvl.retrieval import faiss_backend, measure_recall
from absvl.retrieval.vectors import fill_index, write_embeddings


def _clustered(n, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_explicit_factories_train_or_fall_back_to_flat(tmp_path):
    x = _clustered(400)
    shard = tmp_path / "shard.npy"
    np.save(shard, x)

    notes = []
    index, factory, params = fill_index("IVF8,Flat", 16, [shard], notes)
    assert (factory, params, notes, index.ntotal) == ("IVF8,Flat", {"nprobe": 8}, [], 400)
    faiss_backend.apply_search_params(index, params)
    assert faiss.extract_index_ivf(index).nprobe == 8
    _, ids = index.search(x[:20], 1)
    assert ids[:, 0].tolist() == list(range(20))

    index, factory, params = fill_index("IVF64,Flat", 16, [shard], notes)  # needs 39 × 64 vectors
    assert (factory, params, index.ntotal) == ("Flat", {}, 400) and "too few to train 'IVF64,Flat'" in notes[0]

    index, factory, params = fill_index("HNSW16", 16, [shard], [])
    assert (factory, params) == ("HNSW16", {"efSearch": 64})
    with pytest.raises(ValueError, match="bad FAISS factory string 'IVF,Bogus'"):
        faiss_backend.new_faiss_index(16, "IVF,Bogus")


def test_measure_recall_against_exact_search(tmp_path):
    x = _clustered(3000)
    x[100:110] = x[7]  # ties: equal vectors are not misses
    np.save(tmp_path / "x.npy", x)
    flat = faiss.IndexFlatIP(16)
    flat.add(x)
    assert measure_recall(flat, tmp_path / "x.npy") == 1.0
    ivf, _, _ = fill_index("IVF64,Flat", 16, [tmp_path / "x.npy"], [])
    faiss_backend.apply_search_params(ivf, {"nprobe": 1})
    low = measure_recall(ivf, tmp_path / "x.npy", num_queries=300)
    faiss_backend.apply_search_params(ivf, {"nprobe": 64})  # every list: exact
    assert 0.2 < low < 0.99 and measure_recall(ivf, tmp_path / "x.npy", num_queries=300) == 1.0


def test_write_embeddings_concatenates_the_files_atomically(tmp_path):
    parts = [_clustered(5, seed=1), _clustered(0), _clustered(7, seed=2)]
    files = []
    for i, part in enumerate(parts):
        np.save(tmp_path / f"part{i}.npy", part)
        files.append(tmp_path / f"part{i}.npy")
    write_embeddings(tmp_path / "all.npy", files, 16)
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), np.concatenate(parts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.npy", "part0.npy", "part1.npy", "part2.npy"]
