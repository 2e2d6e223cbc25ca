"""Damaged index files (issue 22): sizes and checksums recorded in meta.json, checked on load (sizes,
the embeddings' header) and by `absvl index verify` (checksums); a truncated index.faiss or
embeddings.npy is one clear error naming the file and the way back; --k beyond the index is clamped."""

import hashlib
import json
import os

import numpy as np
import pytest

from absvl.cli import main
from absvl.retrieval import (
    ImageIndex,
    IndexCorruptError,
    Retriever,
    add_to_index,
    build_index,
    list_images,
    rebuild_index,
    verify_index,
)

FILES = ["embeddings.npy", "index.faiss", "paths.jsonl", "skipped.json"]


@pytest.fixture
def index_dir(model, model_dir, collection, tmp_path):
    """A 6-image Flat index built by ``model`` (recording ``model_dir``)."""
    out = tmp_path / "idx"
    build_index(
        model,
        list_images(collection)[:6],
        out,
        batch_size=4,
        shard_size=4,
        progress=False,
        model_source=str(model_dir),
    )
    return out


def _meta(folder):
    return json.loads((folder / "meta.json").read_text())


def _forget_checksums(folder):
    """Make ``folder`` look written by an absvl from before meta.json recorded its files."""
    meta = _meta(folder)
    meta.pop("files", None)
    (folder / "meta.json").write_text(json.dumps(meta))


def _flip_a_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- recorded sizes and checksums
def test_every_write_records_each_files_size_and_checksum(model, collection, index_dir):
    def assert_recorded(folder):
        files = _meta(folder)["files"]
        assert sorted(files) == FILES
        for name, record in files.items():
            data = (folder / name).read_bytes()
            assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    assert_recorded(index_dir)
    add_to_index(model, list_images(collection), index_dir, progress=False)
    assert_recorded(index_dir)
    rebuild_index(index_dir, "HNSW8")
    assert_recorded(index_dir)
    assert verify_index(index_dir).ok


# --------------------------------------------------------------------------- truncated index.faiss
def test_a_truncated_index_faiss_is_one_error_naming_the_file_and_the_way_back(
    model_dir, index_dir, capsys, monkeypatch
):
    faiss_file = index_dir / "index.faiss"
    size = faiss_file.stat().st_size
    os.truncate(faiss_file, size // 2)
    message = rf"index file {faiss_file} is truncated: {size // 2:,} bytes where meta.json records {size:,}"
    rebuild = rf"`absvl index rebuild --index {index_dir} --factory 'Flat'` \(no images or model needed\)"
    with pytest.raises(IndexCorruptError, match=rf"{message}: rebuild it from the stored embeddings with {rebuild}"):
        ImageIndex.load(index_dir)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve started on a damaged index"))
    for argv in (
        ["search", "a red circle", "--index", str(index_dir)],
        ["index", "add", "--index", str(index_dir), "--images", str(index_dir)],
        ["index", "add", "--index", str(index_dir), "--images", str(index_dir), "--model", str(model_dir)],
        ["serve", "--model", str(model_dir), "--index", str(index_dir)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"absvl: error: index file {faiss_file} is truncated") and err.count("\n") == 1, err
        assert "absvl index rebuild" in err and "Traceback" not in err

    assert main(["index", "rebuild", "--index", str(index_dir), "--factory", "Flat"]) == 0  # the way back
    assert len(ImageIndex.load(index_dir)) == 6
    assert main(["search", "a red circle", "--index", str(index_dir), "--k", "2"]) == 0


def test_an_unreadable_index_faiss_without_recorded_sizes_is_named_too(index_dir):
    _forget_checksums(index_dir)
    faiss_file = index_dir / "index.faiss"
    os.truncate(faiss_file, faiss_file.stat().st_size - 100)
    with pytest.raises(IndexCorruptError, match=rf"{faiss_file} is damaged or truncated: FAISS cannot read it \("):
        ImageIndex.load(index_dir)
    assert rebuild_index(index_dir, "Flat").index_size == 6  # rebuild never reads the damaged file
    assert _meta(index_dir)["files"]["index.faiss"]["bytes"] == faiss_file.stat().st_size  # now recorded


# --------------------------------------------------------------------------- truncated embeddings.npy
def test_a_truncated_embeddings_npy_is_detected_on_load_and_named_by_rebuild(model_dir, index_dir, capsys):
    embeddings = index_dir / "embeddings.npy"
    size = embeddings.stat().st_size
    os.truncate(embeddings, size - 64)
    build_again = (
        rf"build it again from its images with `absvl index build --model {model_dir} --images IMAGES "
        rf"--out {index_dir} --overwrite`"
    )
    with pytest.raises(
        IndexCorruptError,
        match=rf"{embeddings} is truncated: {size - 64:,} bytes where meta.json records {size:,}: .*{build_again}",
    ):
        ImageIndex.load(index_dir)
    assert main(["index", "rebuild", "--index", str(index_dir)]) == 2
    err = capsys.readouterr().err
    assert f"index file {embeddings} is truncated" in err and "mmap" not in err

    _forget_checksums(index_dir)  # an older index: the .npy header still tells
    with pytest.raises(
        IndexCorruptError, match=rf"{embeddings} is truncated: .* where its header promises 6 x 64 float32"
    ):
        ImageIndex.load(index_dir)
    with pytest.raises(IndexCorruptError, match=rf"{embeddings} is truncated"):
        rebuild_index(index_dir)


def test_embeddings_of_the_wrong_shape_are_refused(index_dir):
    _forget_checksums(index_dir)
    np.save(index_dir / "embeddings.npy", np.zeros((5, 64), np.float32))
    with pytest.raises(
        IndexCorruptError, match=r"embeddings.npy holds a float32 array of shape \[5, 64\], not float32 \[6, 64\]"
    ):
        ImageIndex.load(index_dir)


# --------------------------------------------------------------------------- index verify
def test_index_verify_finds_a_changed_byte_that_the_size_check_cannot(model, collection, index_dir, capsys):
    assert main(["index", "verify", "--index", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert f"index {index_dir} verified: 4 files match the sizes and sha256 in meta.json" in out
    assert all(f"ok         {name}" in out for name in FILES)

    embeddings = index_dir / "embeddings.npy"
    _flip_a_byte(embeddings, embeddings.stat().st_size - 10)
    assert len(ImageIndex.load(index_dir)) == 6  # same size: loading (cheap checks) cannot tell
    assert main(["index", "verify", "--index", str(index_dir)]) == 1
    captured = capsys.readouterr()
    assert "damaged    embeddings.npy  does not match its sha256 in meta.json" in captured.out
    assert f"absvl: index {index_dir} is damaged: index file {embeddings} does not match its sha256" in captured.err
    assert "fix: the index cannot be used as it is; build it again from its images" in captured.err
    report = verify_index(index_dir)
    assert not report.ok and [c.status for c in report.files if c.name == "embeddings.npy"] == ["damaged"]

    # the writers that copy the embeddings refuse to carry the damage into a new index
    with pytest.raises(IndexCorruptError, match=rf"{embeddings} does not match its sha256"):
        rebuild_index(index_dir, "Flat")
    with pytest.raises(IndexCorruptError, match=rf"{embeddings} does not match its sha256"):
        add_to_index(model, list_images(collection), index_dir, progress=False)
    assert len(ImageIndex.load(index_dir)) == 6


def test_index_verify_of_a_damaged_index_faiss_points_to_rebuild(index_dir, capsys):
    faiss_file = index_dir / "index.faiss"
    _flip_a_byte(faiss_file, faiss_file.stat().st_size - 4)
    assert main(["index", "verify", "--index", str(index_dir)]) == 1
    assert f"fix: rebuild it from the stored embeddings with `absvl index rebuild --index {index_dir}" in (
        capsys.readouterr().err
    )
    rebuild_index(index_dir, "Flat")
    assert verify_index(index_dir).ok


def test_an_index_without_checksums_loads_and_verify_says_how_to_record_them(index_dir, capsys):
    _forget_checksums(index_dir)
    assert len(ImageIndex.load(index_dir)) == 6
    assert main(["search", "a red circle", "--index", str(index_dir), "--k", "2"]) == 0
    capsys.readouterr()
    assert main(["index", "verify", "--index", str(index_dir)]) == 3
    out = capsys.readouterr().out
    assert "unrecorded index.faiss" in out
    assert (
        f"was not verified: no checksums recorded (written by an older absvl): record them with "
        f"`absvl index rebuild --index {index_dir} --factory 'Flat'`" in out
    )
    assert main(["index", "rebuild", "--index", str(index_dir), "--factory", "Flat"]) == 0
    assert main(["index", "verify", "--index", str(index_dir)]) == 0

    (index_dir / "embeddings.npy").unlink()  # older still: no stored embeddings to rebuild from
    _forget_checksums(index_dir)
    report = verify_index(index_dir)
    assert not report.recorded and report.problem is None
    assert f"build it again with `absvl index build ... --out {index_dir} --overwrite`" in report.fix


def test_index_verify_of_a_folder_that_is_no_index(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert main(["index", "verify", "--index", str(tmp_path / "nothing")]) == 2
    assert "meta.json (an absvl index's meta file) does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- k beyond the index
@pytest.fixture
def guarded_search(monkeypatch):
    """FAISS searches of every index read fail the test when asked for more results than the index holds
    (what made `--k 1000000000` allocate gigabytes)."""
    import faiss

    read_index, asked = faiss.read_index, []

    def reading(*args):
        index = read_index(*args)
        search = index.search

        def guarded(x, k, *rest, **kwargs):
            asked.append(k)
            assert k <= index.ntotal, f"FAISS asked for k={k} results from {index.ntotal} vectors"
            return search(x, k, *rest, **kwargs)

        index.search = guarded
        return index

    monkeypatch.setattr(faiss, "read_index", reading)
    return asked


def test_k_beyond_the_index_is_clamped_to_its_size(model, index_dir, embed, guarded_search, capsys):
    index = ImageIndex.load(index_dir)
    query = embed(index.paths[:1])
    scores, ids = index.search(query[0], k=10**9)
    assert scores.shape == ids.shape == (6,) and sorted(ids.tolist()) == list(range(6))
    scores, ids = index.search_batch(np.repeat(query, 3, axis=0), k=10**9)
    assert ids.shape == (3, 6)

    retriever = Retriever(model, index)
    assert [len(hits) for hits in retriever.search_batch(["a red circle", "a blue square"], k=10**9)] == [6, 6]
    hits = retriever.search("a red circle", k=10**9, rerank=10**9)
    assert len(hits) == 6 and all(h.rerank_score is not None for h in hits)

    assert main(["search", "a red circle", "--index", str(index_dir), "--k", "1000000000", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 6
    assert max(guarded_search) == 6


def test_a_load_racing_a_writers_swap_reads_the_new_folder_instead_of_calling_it_damaged(
    model, collection, index_dir, monkeypatch
):
    from absvl.retrieval import folder as folder_module

    real_check, calls = folder_module.check_sizes, []

    def swapped_meanwhile(folder, meta, **kwargs):
        calls.append(folder)
        if len(calls) == 1:  # a writer publishes a new folder while this read is under way
            monkeypatch.setattr(folder_module, "check_sizes", real_check)
            add_to_index(model, list_images(collection), index_dir, progress=False)
            raise IndexCorruptError(folder / "index.faiss", "is truncated (the old folder, as it went)", "")
        return real_check(folder, meta, **kwargs)

    monkeypatch.setattr(folder_module, "check_sizes", swapped_meanwhile)
    assert len(ImageIndex.load(index_dir)) == 12 and len(calls) == 1
