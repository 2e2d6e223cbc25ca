"""The FAISS image index: listing, building in shards, resuming, skipping bad files, appending, factories."""
import json

import faiss
import numpy as np
import pytest
import torch

from absvl.models.vl import AbsVLModel
from absvl.retrieval import (BuildReport, ImageIndex, IndexMismatchError, add_to_index, build_index, choose_factory,
                             list_images, model_fingerprint)
from absvl.retrieval import index as index_module


def _build(model, images, out, **kwargs):
    kwargs = {"batch_size": 4, "shard_size": 5, "progress": False, **kwargs}
    return build_index(model, images, out, **kwargs)


def _vectors(image_index):
    return image_index.index.reconstruct_n(0, len(image_index))


# --------------------------------------------------------------------------- listing
def test_list_images_from_a_folder_and_from_a_list_file(collection, tmp_path):
    (collection / "notes.txt").write_text("not an image")
    found = list_images(collection)
    assert len(found) == 12 and found == sorted(found)
    assert all(p.is_absolute() and p.suffix == ".jpg" for p in found)

    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    lines = ["# my images", f"../collection/a/{found[0].name}", "", str(found[7]), f"../collection/a/{found[0].name}"]
    listing.write_text("\n".join(lines) + "\n")
    assert list_images(listing) == [found[0], found[7]]  # relative to the list's folder, de-duplicated


def test_list_images_errors_name_the_source(collection, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        list_images(tmp_path / "empty")
    one = next(collection.rglob("*.jpg"))
    with pytest.raises(ValueError, match="is an image"):
        list_images(one)
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="blank.txt lists no image paths"):
        list_images(tmp_path / "blank.txt")


# --------------------------------------------------------------------------- build and load
def test_build_and_load_round_trip(model, model_dir, collection, tmp_path, embed):
    report = _build(model, collection, tmp_path / "idx", model_source=str(model_dir))
    assert isinstance(report, BuildReport)
    assert (report.num_indexed, report.num_total, report.skipped, report.factory) == (12, 12, [], "Flat")
    assert report.out == tmp_path / "idx" and report.seconds > 0
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "meta.json", "paths.jsonl", "skipped.json"]
    assert not (tmp_path / "idx.partial").exists()

    index = ImageIndex.load(tmp_path / "idx")
    paths = list_images(collection)
    assert len(index) == 12 and index.ids == list(range(12))
    assert index.dim == model.backbone.num_features == 64
    assert (index.metric, index.factory, index.fingerprint) == ("ip", "Flat", model_fingerprint(model))
    assert [index.path_of(i) for i in index.ids] == paths  # ids in insertion (sorted) order
    rows = [json.loads(line) for line in (tmp_path / "idx" / "paths.jsonl").read_text().splitlines()]
    assert rows == [{"id": i, "path": str(p)} for i, p in enumerate(paths)]
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["format"] == "absvl-index" and meta["count"] == 12 and meta["model_source"] == str(model_dir)
    with pytest.raises(KeyError, match="id 12 is not in index"):
        index.path_of(12)

    own = embed([paths[3], paths[9]])
    np.testing.assert_allclose(np.linalg.norm(_vectors(index), axis=1), 1.0, atol=1e-5)
    scores, ids = index.search(own, k=3)
    assert ids[:, 0].tolist() == [3, 9]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    scores, ids = index.search(own[:1], k=20)
    assert (ids[0, 12:] == -1).all() and sorted(ids[0, :12].tolist()) == list(range(12))
    with pytest.raises(ValueError, match=r"shape \[Q, 64\]"):
        index.search(np.zeros((1, 5), np.float32), 3)


def test_bad_and_missing_images_are_skipped_and_listed(model, image_files, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(image_files[0].read_bytes()[:200])
    missing = tmp_path / "missing.jpg"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, [*image_files[:3], corrupt, missing, *image_files[3:6]])) + "\n")

    report = _build(model, listing, tmp_path / "idx")
    assert (report.num_indexed, report.num_total) == (6, 8)
    assert [path for path, _ in report.skipped] == [str(corrupt), str(missing)]
    assert "file not found" in report.skipped[1][1]
    index = ImageIndex.load(tmp_path / "idx")
    assert index.paths == image_files[:6]
    assert [tuple(s) for s in json.loads((tmp_path / "idx" / "skipped.json").read_text())] == report.skipped

    listing.write_text(f"{missing}\n")
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        _build(model, listing, tmp_path / "idx2")
    assert not (tmp_path / "idx2").exists()


def test_existing_output_is_refused_unless_overwrite(model, collection, tmp_path):
    _build(model, collection, tmp_path / "idx")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _build(model, collection, tmp_path / "idx")
    report = _build(model, list_images(collection)[:4], tmp_path / "idx", overwrite=True, num_workers=2)
    assert report.num_indexed == 4 and len(ImageIndex.load(tmp_path / "idx")) == 4


# --------------------------------------------------------------------------- resume
def _count_embedded(monkeypatch, model, fail_at_call=None):
    """Wrap ``encode_image_bottom_up``: counts embedded images; raises on call ``fail_at_call``."""
    embedded, original = [], model.encode_image_bottom_up

    def counting(images):
        if fail_at_call is not None and len(embedded) == fail_at_call:
            raise KeyboardInterrupt("simulated interruption")
        embedded.append(len(images))
        return original(images)

    monkeypatch.setattr(model, "encode_image_bottom_up", counting)
    return embedded


def test_interrupted_build_resumes_from_its_shards(model, model_dir, collection, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    embedded = _count_embedded(monkeypatch, model, fail_at_call=3)  # shard 0 = 2 batches (4 + 1), then dies
    with pytest.raises(KeyboardInterrupt):
        _build(model, collection, out)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "idx.partial" / "shards").iterdir()) == ["shard_00000.json", "shard_00000.npy"]
    assert sum(embedded) == 5 + 4

    monkeypatch.undo()
    embedded = _count_embedded(monkeypatch, model)
    report = _build(model, collection, out)
    assert sum(embedded) == 12 - 5 and report.num_indexed == 12
    assert not (tmp_path / "idx.partial").exists()

    fresh = AbsVLModel.from_pretrained(model_dir)
    _build(fresh, collection, tmp_path / "uninterrupted", batch_size=3, shard_size=100)
    resumed, uninterrupted = ImageIndex.load(out), ImageIndex.load(tmp_path / "uninterrupted")
    assert resumed.paths == uninterrupted.paths
    np.testing.assert_allclose(_vectors(resumed), _vectors(uninterrupted), atol=1e-5)


def test_a_partial_build_of_something_else_is_not_resumed(model, collection, tmp_path, monkeypatch):
    _count_embedded(monkeypatch, model, fail_at_call=2)
    with pytest.raises(KeyboardInterrupt):
        _build(model, collection, tmp_path / "idx")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"idx.partial holds an interrupted build .*images_hash.*delete it or pass --no-resume"):
        _build(model, list_images(collection)[:7], tmp_path / "idx")
    report = _build(model, list_images(collection)[:7], tmp_path / "idx", resume=False)
    assert report.num_indexed == 7


# --------------------------------------------------------------------------- fingerprint and append
def test_fingerprint_survives_save_load_and_changes_with_any_weight(model, model_dir, tmp_path):
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(AbsVLModel.from_pretrained(model_dir))
    model.save_pretrained(tmp_path / "again")
    assert fingerprint == model_fingerprint(AbsVLModel.from_pretrained(tmp_path / "again"))
    with torch.no_grad():
        model.fusion.token_type_embeddings.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != fingerprint


def test_add_to_index_appends_and_new_images_are_findable(model, model_dir, collection, tmp_path, embed):
    paths = list_images(collection)
    _build(model, paths[:8], tmp_path / "idx")
    report = add_to_index(model, paths[5:], tmp_path / "idx", batch_size=3, progress=False)
    assert (report.num_indexed, report.num_total, report.index_size) == (4, 4, 12)
    index = ImageIndex.load(tmp_path / "idx")
    assert index.paths == paths and index.ids == list(range(12))
    scores, ids = index.search(embed(paths[8:]), k=1)
    assert ids[:, 0].tolist() == [8, 9, 10, 11]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert add_to_index(model, paths, tmp_path / "idx", progress=False).num_indexed == 0  # all present

    other = AbsVLModel.from_pretrained(model_dir)
    with torch.no_grad():
        other.backbone.norm.bias.add_(0.1)
    with pytest.raises(IndexMismatchError, match="rebuild the index with this model"):
        add_to_index(other, paths, tmp_path / "idx", progress=False)
    assert len(ImageIndex.load(tmp_path / "idx")) == 12


# --------------------------------------------------------------------------- factories
def test_factory_choice_by_size():
    assert choose_factory(1_000, 256) == ("Flat", {})
    assert choose_factory(50_000, 256) == ("Flat", {})
    assert choose_factory(100_000, 256) == ("IVF1024,Flat", {"nprobe": 8})
    assert choose_factory(1_000_000, 256) == ("IVF4096,Flat", {"nprobe": 16})
    assert choose_factory(10_000_000, 256) == ("IVF16384,SQ8", {"nprobe": 64})
    assert index_module.ivf_nlist(1_000_000) == 4096


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
    index, factory, params = index_module.fill_index("IVF8,Flat", 16, [shard], notes)
    assert (factory, params, notes, index.ntotal) == ("IVF8,Flat", {"nprobe": 8}, [], 400)
    index_module.apply_search_params(index, params)
    assert faiss.extract_index_ivf(index).nprobe == 8
    _, ids = index.search(x[:20], 1)
    assert ids[:, 0].tolist() == list(range(20))

    index, factory, params = index_module.fill_index("IVF64,Flat", 16, [shard], notes)  # needs 39 × 64 vectors
    assert (factory, params, index.ntotal) == ("Flat", {}, 400) and "too few to train 'IVF64,Flat'" in notes[0]

    index, factory, params = index_module.fill_index("HNSW16", 16, [shard], [])
    assert (factory, params) == ("HNSW16", {"efSearch": 64})
    with pytest.raises(ValueError, match="bad FAISS factory string 'IVF,Bogus'"):
        index_module.new_faiss_index(16, "IVF,Bogus")


def test_build_applies_stored_search_params_and_reports_fallbacks(model, collection, tmp_path):
    report = _build(model, collection, tmp_path / "hnsw", factory="HNSW8")
    assert report.factory == "HNSW8" and report.notes == []
    index = ImageIndex.load(tmp_path / "hnsw")
    assert faiss.downcast_index(index.index).hnsw.efSearch == 64
    assert index.meta["search_params"] == {"efSearch": 64}
    index.set_search_params(efSearch=16)
    assert faiss.downcast_index(index.index).hnsw.efSearch == 16

    report = _build(model, collection, tmp_path / "ivf", factory="IVF4,Flat")
    assert report.factory == "Flat" and "too few to train" in report.notes[0]
    assert ImageIndex.load(tmp_path / "ivf").factory == "Flat"


def test_gpu_detection(monkeypatch):
    assert index_module.gpu_available() == (hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available())
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert index_module.gpu_available()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert not index_module.gpu_available()
    monkeypatch.delattr(faiss, "StandardGpuResources")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert not index_module.gpu_available()
    assert index_module.to_cpu(index_module.to_gpu(faiss.IndexFlatIP(4))).d == 4  # no GPU: unchanged, on CPU
