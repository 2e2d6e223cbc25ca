"""The FAISS image index: listing, building in shards, resuming, skipping bad files, appending, factories,
the write lock, crash-safe swaps, stored embeddings, rebuilds and recall."""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from absvl.models.vl import AbsVLForRetrieval
from absvl.retrieval import (
    BuildReport,
    ImageIndex,
    IndexLockedError,
    IndexMismatchError,
    add_to_index,
    build_index,
    faiss_backend,
    list_images,
    model_fingerprint,
    rebuild_index,
)
from absvl.retrieval.lock import index_lock


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
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "embeddings.npy",
        "index.faiss",
        "meta.json",
        "paths.jsonl",
        "skipped.json",
    ]
    assert not (tmp_path / "idx.partial").exists()
    assert report.recall_at_10 == 1.0  # Flat is exact

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
    assert meta["recall_at_10"] == 1.0
    np.testing.assert_array_equal(np.load(index.embeddings_file), _vectors(index))  # row i = id i
    with pytest.raises(KeyError, match="id 12 is not in index"):
        index.path_of(12)

    own = embed([paths[3], paths[9]])
    np.testing.assert_allclose(np.linalg.norm(_vectors(index), axis=1), 1.0, atol=1e-5)
    scores, ids = index.search(own, k=3)
    assert ids[:, 0].tolist() == [3, 9]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    scores, ids = index.search(own[:1], k=20)
    assert (ids[0, 12:] == -1).all() and sorted(ids[0, :12].tolist()) == list(range(12))
    with pytest.raises(ValueError, match=r"shape \[64\] or \[Q, 64\]"):
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


def test_a_damaged_or_foreign_folder_is_refused_naming_the_file(model, collection, tmp_path):
    _build(model, list_images(collection)[:3], tmp_path / "idx")
    meta = tmp_path / "idx" / "meta.json"
    meta.write_text('{"format": "absvl-index", ')
    with pytest.raises(ValueError, match=rf"{meta} \(an absvl index's meta file\) is not valid JSON .*rebuild it"):
        ImageIndex.load(tmp_path / "idx")
    meta.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="is not an absvl index meta file"):
        ImageIndex.load(tmp_path / "idx")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="has no meta.json: not an absvl index folder"):
        ImageIndex.load(tmp_path / "other")
    (tmp_path / "gone.partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"gone does not exist \(an interrupted build left .*gone.partial"):
        ImageIndex.load(tmp_path / "gone")


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
    assert sorted(p.name for p in (tmp_path / "idx.partial" / "shards").iterdir()) == [
        "shard_00000.json",
        "shard_00000.npy",
    ]
    assert sum(embedded) == 5 + 4

    monkeypatch.undo()
    embedded = _count_embedded(monkeypatch, model)
    report = _build(model, collection, out)
    assert sum(embedded) == 12 - 5 and report.num_indexed == 12
    assert not (tmp_path / "idx.partial").exists()

    fresh = AbsVLForRetrieval.from_pretrained(model_dir)
    _build(fresh, collection, tmp_path / "uninterrupted", batch_size=3, shard_size=100)
    resumed, uninterrupted = ImageIndex.load(out), ImageIndex.load(tmp_path / "uninterrupted")
    assert resumed.paths == uninterrupted.paths
    np.testing.assert_allclose(_vectors(resumed), _vectors(uninterrupted), atol=1e-5)


def test_the_embedding_throughput_counts_only_the_images_this_call_embedded(
    model, model_dir, collection, tmp_path, monkeypatch, capsys
):
    from absvl.cli import main

    out = tmp_path / "idx"
    _count_embedded(monkeypatch, model, fail_at_call=3)  # shard 0 (5 images) is committed, then it dies
    with pytest.raises(KeyboardInterrupt):
        _build(model, collection, out)
    monkeypatch.undo()
    report = _build(model, collection, out)
    assert (report.num_indexed, report.num_embedded) == (12, 12 - 5) and report.embedding_seconds > 0
    assert report.embedding_images_per_second == pytest.approx(7 / report.embedding_seconds)

    capsys.readouterr()
    assert (
        main(["index", "build", "--model", str(model_dir), "--images", str(collection), "--out", str(tmp_path / "c")])
        == 0
    )
    captured = capsys.readouterr()
    assert "  embedding: 12 images read and embedded in " in captured.out and "images/s" in captured.out
    assert "recall@10 against exact search" in captured.out
    assert "embedding images: 100%" in captured.err and "12/12" in captured.err  # the progress bar (tqdm)


def test_a_partial_build_of_something_else_is_not_resumed(model, collection, tmp_path, monkeypatch):
    _count_embedded(monkeypatch, model, fail_at_call=2)
    with pytest.raises(KeyboardInterrupt):
        _build(model, collection, tmp_path / "idx")
    monkeypatch.undo()
    with pytest.raises(
        ValueError, match=r"idx.partial holds an interrupted build .*images_hash.*delete it or pass --no-resume"
    ):
        _build(model, list_images(collection)[:7], tmp_path / "idx")
    report = _build(model, list_images(collection)[:7], tmp_path / "idx", resume=False)
    assert report.num_indexed == 7


# --------------------------------------------------------------------------- fingerprint and append
def test_fingerprint_survives_save_load_and_changes_with_any_weight(model, model_dir, tmp_path):
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(AbsVLForRetrieval.from_pretrained(model_dir))
    model.save_pretrained(tmp_path / "again")
    assert fingerprint == model_fingerprint(AbsVLForRetrieval.from_pretrained(tmp_path / "again"))
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

    other = AbsVLForRetrieval.from_pretrained(model_dir)
    with torch.no_grad():
        other.backbone.norm.bias.add_(0.1)
    with pytest.raises(IndexMismatchError, match="rebuild the index with this model"):
        add_to_index(other, paths, tmp_path / "idx", progress=False)
    assert len(ImageIndex.load(tmp_path / "idx")) == 12


# --------------------------------------------------------------------------- factories and placement
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


class GpuIndexStandIn:
    """What ``faiss.index_cpu_to_gpu`` returns, as far as absvl uses it: it searches like the index it copies."""

    def __init__(self, cpu_index):
        self.cpu_index, self.d, self.ntotal = cpu_index, cpu_index.d, cpu_index.ntotal

    def search(self, queries, k):
        return self.cpu_index.search(queries, k)


@pytest.fixture
def faiss_gpu(monkeypatch):
    """Stand-ins for FAISS's GPU functions (HNSW has no GPU version, as in FAISS) and one CUDA device;
    yields the GPU numbers indexes were copied to."""
    copies, downcast = [], faiss.downcast_index

    def cpu_to_gpu(resources, device, index):
        if "HNSW" in type(downcast(index)).__name__:
            raise RuntimeError("Error in index_cpu_to_gpu: this index type is not implemented on GPU")
        copies.append(device)
        return GpuIndexStandIn(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", cpu_to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index.cpu_index, raising=False)
    monkeypatch.setattr(
        faiss, "downcast_index", lambda index: index if isinstance(index, GpuIndexStandIn) else downcast(index)
    )
    monkeypatch.setattr(faiss_backend, "_GPU_RESOURCES", [])
    return copies


def _in_memory_index(factory: str = "Flat"):
    """An ImageIndex of 64 random unit vectors (no folder written) and the vectors."""
    vectors = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    faiss.normalize_L2(vectors)
    index = faiss_backend.new_faiss_index(8, factory)
    index.add(vectors)
    return ImageIndex(
        Path("memory.index"), index, {"dim": 8, "factory": factory}, [Path(f"{i}.png") for i in range(64)], []
    ), vectors


def test_index_placement_without_a_gpu():
    if faiss_backend.gpu_available():
        pytest.skip("FAISS sees a GPU here")
    image_index, _ = _in_memory_index()
    cpu_index = image_index.index
    assert image_index.to("auto").index is cpu_index and image_index.device == "cpu"
    with pytest.raises(
        RuntimeError, match="cannot be held on cuda: (this FAISS build has no GPU support|no CUDA device)"
    ):
        image_index.to("cuda")
    with pytest.raises(ValueError, match="'gpu' must be one of auto, cpu, cuda"):
        image_index.to("gpu")
    assert image_index.index is cpu_index


def test_index_placement_on_a_gpu(faiss_gpu):
    image_index, vectors = _in_memory_index()
    expected = image_index.search(vectors[:5], 3)
    assert image_index.to("auto").device == "cuda" and faiss_gpu == [0]
    for found, want in zip(image_index.search(vectors[:5], 3), expected):
        np.testing.assert_array_equal(found, want)
    assert image_index.to("cuda").device == "cuda" and faiss_gpu == [0]  # already there: not copied again
    assert image_index.to("cpu").device == "cpu" and type(image_index.index).__name__ == "IndexFlat"
    assert image_index.to("cuda").device == "cuda" and faiss_gpu == [0, 0]


def test_index_placement_of_an_index_without_a_gpu_version(faiss_gpu, monkeypatch):
    image_index, _ = _in_memory_index("HNSW32")
    assert image_index.to("auto").device == "cpu"  # auto: kept on the CPU
    with pytest.raises(RuntimeError, match="no GPU version of its 'HNSW32' index"):
        image_index.to("cuda")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="cannot be held on cuda: no CUDA device is visible"):
        _in_memory_index()[0].to("cuda")
    assert faiss_gpu == []


# --------------------------------------------------------------------------- writers: lock and crash-safe swap
def _hold_lock(lock_file):
    """A separate process holding ``flock`` on ``lock_file`` (pid written in it) until it is killed."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_while_another_process_writes(model, collection, tmp_path):
    paths = list_images(collection)
    out = tmp_path / "idx"
    _build(model, paths[:6], out)
    before = (out / "index.faiss").read_bytes(), (out / "paths.jsonl").read_text()
    lock = tmp_path / "idx.lock"
    holder = _hold_lock(lock)
    try:
        message = (
            rf"index {out} is being written by absvl process {holder.pid}, running on this host; wait for it to "
            rf"finish \(the lock {lock} is not stale: the OS releases it the moment that process exits"
        )
        with pytest.raises(IndexLockedError, match=message) as refused:
            add_to_index(model, paths, out, progress=False)
        assert "remove" not in str(refused.value) and "delete" not in str(refused.value)
        with pytest.raises(IndexLockedError, match=message):
            _build(model, paths, out, overwrite=True)
        with pytest.raises(IndexLockedError):
            rebuild_index(out, "Flat")
        assert ((out / "index.faiss").read_bytes(), (out / "paths.jsonl").read_text()) == before
        assert not (tmp_path / "idx.partial").exists()
        assert len(ImageIndex.load(out)) == 6  # readers never wait

        holder.send_signal(signal.SIGSTOP)  # a stopped writer is alive: its lock is not stale either
        _wait_for_state(holder.pid, "T")
        with pytest.raises(
            IndexLockedError, match=rf"process {holder.pid} on this host, which is stopped .*`kill -CONT {holder.pid}`"
        ) as refused:
            add_to_index(model, paths, out, progress=False)
        assert "remove" not in str(refused.value) and "not stale" in str(refused.value)
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the OS drops the lock
        holder.wait()
    assert lock.exists()
    assert add_to_index(model, paths, out, progress=False).index_size == 12  # the dead holder's lock: taken over
    pid, host, _ = lock.read_text().split()
    assert (int(pid), host) == (os.getpid(), socket.gethostname())  # the holder record is this writer's now


def _wait_for_state(pid, state, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached state {state}")


def test_a_writer_whose_lock_file_is_deleted_publishes_nothing(model, collection, tmp_path, monkeypatch):
    """SIGSTOP a writer, delete its lock, let a second writer run: the first, resumed, must not publish
    over the second's index (it stops with an error saying why)."""
    paths, out = list_images(collection), tmp_path / "idx"
    _build(model, paths[:6], out)
    before = (out / "index.faiss").read_bytes(), (out / "meta.json").read_text()
    original = model.encode_image_bottom_up

    def lock_deleted_meanwhile(images):
        (tmp_path / "idx.lock").unlink(missing_ok=True)
        return original(images)

    monkeypatch.setattr(model, "encode_image_bottom_up", lock_deleted_meanwhile)
    with pytest.raises(IndexLockedError, match=r"idx.lock of index .* was deleted or replaced while this process"):
        add_to_index(model, paths, out, progress=False)
    assert ((out / "index.faiss").read_bytes(), (out / "meta.json").read_text()) == before
    monkeypatch.undo()

    with index_lock(out) as held:  # the same check guards every writer right up to its swap
        (tmp_path / "idx.lock").unlink()
        (tmp_path / "idx.lock").write_text("4242 otherhost\n")
        with pytest.raises(IndexLockedError, match="nothing was published; run it again"):
            held.check()
    assert add_to_index(model, paths, out, progress=False).index_size == 12


def test_a_lock_file_replaced_while_it_is_being_locked_is_locked_again(tmp_path, monkeypatch):
    """The takeover is atomic: a lock taken on a file that another process replaced meanwhile (its inode
    no longer at the path) is dropped, and the file now at the path is locked, or refused if held."""
    out, lock = tmp_path / "idx", tmp_path / "idx.lock"
    lock.write_text("999999999\n")  # a dead holder's record
    replacement = tmp_path / "replacement.lock"
    replacement.touch()
    real_flock, calls = fcntl.flock, []

    def flock(fd, op):
        if not calls:  # between our open and our flock, someone puts a held lock file at the path
            os.replace(replacement, lock)
            calls.append(_hold_lock(lock))
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    try:
        with pytest.raises(IndexLockedError) as refused, index_lock(out):
            pytest.fail("locked a file that is no longer at the lock's path")
        assert f"being written by absvl process {calls[0].pid}, running on this host" in str(refused.value)
    finally:
        for holder in calls:
            holder.kill()
            holder.wait()
    with index_lock(out) as held:  # the holder died: taken over
        held.check()
        assert lock.read_text().startswith(f"{os.getpid()} ")


def _crash_mid_swap(monkeypatch, out, write):
    """Run ``write()`` with the swap's second rename (the new folder onto ``out``) failing."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out and Path(src).name != f".old-{out.name}":
            raise OSError("simulated crash between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        write()
    monkeypatch.undo()


def test_a_swap_interrupted_between_its_renames_keeps_the_old_index(model, collection, tmp_path, monkeypatch):
    paths, out = list_images(collection), tmp_path / "idx"
    _build(model, paths[:4], out)
    _crash_mid_swap(monkeypatch, out, lambda: _build(model, paths, out, overwrite=True))
    assert not out.exists() and (tmp_path / ".old-idx").is_dir()  # the state a crash leaves

    index = ImageIndex.load(out)  # opening recovers: the old index is back
    assert index.paths == paths[:4] and not (tmp_path / ".old-idx").exists()
    embedded = _count_embedded(monkeypatch, model)
    assert _build(model, paths, out, overwrite=True).num_indexed == 12
    assert sum(embedded) == 0  # the finished build's shards were kept: only the swap is redone
    assert ImageIndex.load(out).paths == paths


def test_an_interrupted_add_or_rebuild_is_recovered_by_the_next_writer(model, collection, tmp_path, monkeypatch):
    paths, out = list_images(collection), tmp_path / "idx"
    _build(model, paths[:6], out)
    _crash_mid_swap(monkeypatch, out, lambda: add_to_index(model, paths, out, progress=False))
    assert add_to_index(model, paths, out, progress=False).index_size == 12  # recovers, then appends
    assert ImageIndex.load(out).paths == paths

    _crash_mid_swap(monkeypatch, out, lambda: rebuild_index(out, "HNSW8"))
    assert not list(tmp_path.glob(".tmp-idx-*"))  # a failed rebuild leaves no staging folder
    assert ImageIndex.load(out).factory == "Flat"  # the old one
    assert rebuild_index(out, "HNSW8").factory == "HNSW8"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --------------------------------------------------------------------------- stored embeddings, rebuild
def test_rebuild_makes_a_new_factory_from_the_stored_embeddings(model, collection, tmp_path, embed, monkeypatch):
    paths = list_images(collection)
    out = tmp_path / "idx"
    _build(model, paths, out)
    flat = ImageIndex.load(out)
    embedded = _count_embedded(monkeypatch, model)
    report = flat.rebuild("HNSW8")  # the API reloads the object
    assert sum(embedded) == 0
    assert (report.factory, report.index_size, flat.factory, len(flat)) == ("HNSW8", 12, "HNSW8", 12)
    assert 0.0 < report.recall_at_10 <= 1.0 and flat.meta["recall_at_10"] == report.recall_at_10
    assert flat.meta["search_params"] == {"efSearch": 64} and flat.paths == paths
    assert flat.meta["fingerprint"] == model_fingerprint(model)
    np.testing.assert_array_equal(np.load(flat.embeddings_file), _vectors(flat))
    scores, ids = flat.search(embed(paths[5:6])[0], k=1)  # one [C] query → [k] arrays
    assert ids.tolist() == [5] and scores.shape == (1,)

    (out / "embeddings.npy").unlink()  # an index written before indexes kept their vectors (or checksums)
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("files", None)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"keeps no embeddings.npy .*absvl index build --overwrite"):
        rebuild_index(out)
    report = add_to_index(model, [collection / "a" / "extra.jpg"], out, progress=False)
    assert report.recall_at_10 is None and "keeps no embeddings.npy" in report.notes[0]


def test_python_api_build_add_search_batch(model, collection, tmp_path, embed):
    paths = list_images(collection)
    index = ImageIndex.build(model, paths[:8], tmp_path / "idx", batch_size=4, progress=False)
    assert isinstance(index, ImageIndex) and len(index) == 8
    report = index.add(model, paths, batch_size=4, progress=False)
    assert report.num_indexed == 4 and len(index) == 12 and index.paths == paths
    queries = embed(paths)
    scores, ids = index.search_batch(queries, k=2, batch_size=5)
    assert scores.shape == ids.shape == (12, 2) and ids[:, 0].tolist() == list(range(12))
    np.testing.assert_array_equal(ids, index.search(queries, k=2)[1])
    with pytest.raises(ValueError, match=r"shape \[Q, 64\]"):
        index.search_batch(queries[0], k=2)
