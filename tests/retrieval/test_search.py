"""Text → image search, top-down re-ranking, fingerprint checks and the CLI."""

import json

import numpy as np
import pytest
import torch

from absvl.cli import main
from absvl.models.vl import AbsVLForRetrieval
from absvl.retrieval import ImageIndex, IndexMismatchError, Retriever, SearchHit, build_index, model_fingerprint

QUERIES = ["a red circle", "two blue squares and a green triangle", "a small yellow triangle"]


@pytest.fixture
def index_dir(model, model_dir, collection, tmp_path):
    build_index(model, collection, tmp_path / "idx", batch_size=8, progress=False, model_source=str(model_dir))
    return tmp_path / "idx"


@pytest.fixture
def retriever(model, index_dir):
    return Retriever(model, index_dir)


def _itm(model, paths, query):
    """Re-ranking scores (ITM log-odds + contrastive logit) computed directly, one pair at a time."""
    text = model.processor(text=[query])
    with torch.no_grad():
        return [
            model.rerank_score(
                model.processor(images=[str(p)])["images"], text["input_ids"], text["attention_mask"]
            ).item()
            for p in paths
        ]


def test_search_ranks_by_cosine_of_xi_and_image_embedding(retriever, model, embed):
    hits = retriever.search(QUERIES[0], k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5] and all(isinstance(h, SearchHit) for h in hits)
    assert all(h.rerank_score is None for h in hits)
    text = model.processor(text=[QUERIES[0]])
    with torch.no_grad():
        xi = model.encode_text(text["input_ids"], text["attention_mask"]).numpy()[0]
    images = embed(retriever.index.paths)
    cosine = images @ xi
    assert [h.id for h in hits] == np.argsort(-cosine)[:5].tolist()
    np.testing.assert_allclose([h.score for h in hits], np.sort(cosine)[::-1][:5], atol=1e-5)
    assert [h.path for h in hits] == [retriever.index.path_of(h.id) for h in hits]
    assert len(retriever.search(QUERIES[0], k=50)) == 12  # fewer images than k


def test_search_batch_equals_one_query_at_a_time(retriever):
    batched = retriever.search_batch(QUERIES, k=4)
    for query, hits in zip(QUERIES, batched):
        single = retriever.search(query, k=4)
        assert [h.id for h in hits] == [h.id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-5)
    assert retriever.search_batch([], k=3) == []


def test_rerank_reorders_the_candidates_by_top_down_itm_score(retriever, model):
    query, depth = QUERIES[1], 8
    candidates = retriever.search(query, k=depth)
    reranked = retriever.search(query, k=depth, rerank=depth, batch_size=3)
    assert sorted(h.id for h in reranked) == sorted(h.id for h in candidates)
    direct = dict(zip([h.id for h in candidates], _itm(model, [h.path for h in candidates], query)))
    np.testing.assert_allclose([h.rerank_score for h in reranked], [direct[h.id] for h in reranked], atol=1e-5)
    expected = sorted(candidates, key=lambda h: (-direct[h.id], -h.score))
    assert [h.id for h in reranked] == [h.id for h in expected]
    assert [h.rank for h in reranked] == list(range(1, depth + 1))
    cosine = {h.id: h.score for h in candidates}
    assert all(abs(h.score - cosine[h.id]) < 1e-6 for h in reranked)  # the contrastive score is kept

    top3 = retriever.search(query, k=3, rerank=depth)
    assert [h.id for h in top3] == [h.id for h in reranked[:3]]
    assert len(retriever.search(query, k=10, rerank=4)) == 4  # k is clamped to the re-ranked depth
    other = retriever.search(QUERIES[0], k=depth, rerank=depth)
    assert {h.id: h.rerank_score for h in other} != {h.id: h.rerank_score for h in reranked}  # the query steers


def test_batched_rerank_runs_each_candidate_first_pass_once(retriever, model, monkeypatch):
    """Queries sharing candidates share their first (bottom-up) pass; the scores are the full per-pair ones."""
    depth, seen = 8, []
    first_pass = model.first_pass
    monkeypatch.setattr(model, "first_pass", lambda images, *a: seen.append(len(images)) or first_pass(images, *a))
    reranked = retriever.search_batch(QUERIES, k=depth, rerank=depth, batch_size=5)
    monkeypatch.undo()
    candidates = retriever.search_batch(QUERIES, k=depth)
    unique = {h.id for hits in candidates for h in hits}
    assert sum(seen) == len(unique) < len(QUERIES) * depth and max(seen) <= 5
    for query, hits in zip(QUERIES, reranked):
        direct = _itm(model, [h.path for h in hits], query)
        np.testing.assert_allclose([h.rerank_score for h in hits], direct, atol=1e-5)
        assert [h.id for h in hits] == [h.id for h in retriever.search(query, k=depth, rerank=depth)]


def test_unreadable_candidates_are_dropped_from_reranking(retriever):
    hits = retriever.search(QUERIES[2], k=5)
    hits[0].path.write_bytes(b"not an image any more")
    hits[2].path.unlink()
    reranked = retriever.search(QUERIES[2], k=5, rerank=5)
    assert len(reranked) == 3 and retriever.num_dropped == 2
    assert {h.id for h in reranked} == {hits[1].id, hits[3].id, hits[4].id}


def test_search_records_the_seconds_of_its_two_phases(retriever):
    retriever.search(QUERIES[0], k=3)
    assert set(retriever.last_timings) == {"search", "rerank"}
    assert retriever.last_timings["search"] > 0 and retriever.last_timings["rerank"] == 0.0
    retriever.search_batch(QUERIES, k=3, rerank=5)
    assert retriever.last_timings["search"] > 0 and retriever.last_timings["rerank"] > 0


def test_bad_arguments_are_named(retriever):
    for query in ("", "   \n"):
        with pytest.raises(ValueError, match="query is empty"):
            retriever.search(query)
    with pytest.raises(ValueError, match="k=0"):
        retriever.search("a circle", k=0)
    with pytest.raises(ValueError, match="rerank=-1"):
        retriever.search("a circle", rerank=-1)
    with pytest.raises(TypeError, match="list of strings"):
        retriever.search_batch("a circle")


def test_index_of_another_model_is_refused(model_dir, index_dir):
    other = AbsVLForRetrieval.from_pretrained(model_dir)
    with torch.no_grad():
        other.backbone.decoders[0].linear.weight.mul_(1.01)
    index = ImageIndex.load(index_dir)
    with pytest.raises(IndexMismatchError) as err:
        Retriever(other, index)
    message = str(err.value)
    assert index.fingerprint[:16] in message and model_fingerprint(other)[:16] in message
    assert "rebuild the index with this model" in message
    assert isinstance(err.value, ValueError)


# --------------------------------------------------------------------------- CLI
def test_cli_build_add_and_search(model_dir, collection, tmp_path, capsys):
    images = sorted(collection.rglob("*.jpg"))
    listing = tmp_path / "first.txt"
    listing.write_text("\n".join(map(str, images[:8])) + f"\n{tmp_path / 'missing.jpg'}\n")
    out = tmp_path / "cli-idx"
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                str(model_dir),
                "--images",
                str(listing),
                "--out",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"indexed 8 images into {out} (1 skipped, factory Flat" in printed and "images/s" in printed
    assert f"skipped {tmp_path / 'missing.jpg'}: file not found" in printed

    assert main(["index", "build", "--model", str(model_dir), "--images", str(listing), "--out", str(out)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err

    assert main(["index", "add", "--index", str(out), "--images", str(collection)]) == 0  # model from the meta
    assert "added 4 images" in capsys.readouterr().out and len(ImageIndex.load(out)) == 12

    assert main(["search", "a red circle", "--index", str(out), "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "rerank", "path"] and len(table) == 4
    assert table[1].split()[0] == "1" and table[1].split()[2] == "-"

    assert (
        main(
            [
                "search",
                "a red circle",
                "--model",
                str(model_dir),
                "--index",
                str(out),
                "-k",
                "3",
                "--rerank",
                "6",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == "a red circle" and len(result["hits"]) == 3
    assert set(result["hits"][0]) == {"rank", "id", "path", "score", "rerank_score"}
    scores = [h["rerank_score"] for h in result["hits"]]
    assert scores == sorted(scores, reverse=True)

    assert main(["search", "  ", "--index", str(out)]) == 2
    assert "query is empty" in capsys.readouterr().err
    assert main(["search", "a circle", "--index", str(out), "--nprobe", "4"]) == 2  # a Flat index has no lists
    assert "cannot set search parameters 'nprobe=4'" in capsys.readouterr().err
    assert main(["search", "a circle", "--index", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
