"""Retrieval training (contrastive + ITM on hard negatives), its evaluation, and search with the result."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from absvl.cli import main
from absvl.data.captions import load_karpathy
from absvl.evaluation.retrieval import _rerank, evaluate_retrieval, evaluate_retrieval_model
from absvl.models.vl import AbsVLConfig, AbsVLForRetrieval, load_model
from absvl.retrieval import ImageIndex, Retriever
from absvl.training.config import ConfigError, RetrievalConfig, load_config
from absvl.training.retrieval import RetrievalTask, sample_negatives, train_retrieval


def retrieval_overrides(shapes_root, tiny_model, out, steps):
    return [
        *tiny_model,
        "model.max_text_len=40",
        "model.var_loss_weight=0.1",
        f"model.text_encoder={shapes_root / 'text_encoder'}",
        f"data.captions={shapes_root / 'dataset_shapes.json'}",
        f"data.images={shapes_root / 'images'}",
        "data.shapes=null",
        "data.num_workers=0",
        "data.val_split=val",
        f"train.output_dir={out}",
        "train.batch_size=16",
        f"train.max_steps={steps}",
        "train.lr=2e-3",
        "train.warmup_ratio=0.0",
        "train.log_every=5",
        "train.trackers=[]",
        "train.rerank_k=4",
    ]


@pytest.fixture(scope="module")
def trained(shapes_root, tiny_model_overrides, tmp_path_factory):
    """A tiny model trained for retrieval on the 32 training images of the tiny world (seconds)."""
    out = tmp_path_factory.mktemp("retrieval_run")
    config = load_config(
        "configs/shapes_retrieval.yaml",
        retrieval_overrides(shapes_root, tiny_model_overrides, out, 80),
        RetrievalConfig,
    )
    summary = train_retrieval(config)
    return summary


def test_training_exports_a_model_and_validates_with_recall(trained):
    assert trained["step"] == 80
    val = trained["val"]
    assert set(val["contrastive"]) == {"ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10", "r_mean"}
    assert val["images"] > 0 and val["captions"] == 5 * val["images"]
    model = load_model(trained["export"])
    assert type(model) is AbsVLForRetrieval and not hasattr(model, "vqa_head")  # it claims only what it trained


def test_search_finds_the_captioned_image_well_above_chance(trained, shapes_root, tmp_path, capsys):
    images = load_karpathy(shapes_root / "dataset_shapes.json", ["train"], shapes_root / "images")
    index = tmp_path / "index"
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                trained["export"],
                "--images",
                str(shapes_root / "images" / "train2014"),
                "--out",
                str(index),
            ]
        )
        == 0
    )
    capsys.readouterr()
    query = images[0].captions[0]
    assert main(["search", query, "--model", trained["export"], "--index", str(index), "-k", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["query"] == query and [h["rank"] for h in printed["hits"]] == [1, 2, 3, 4, 5]

    retriever = Retriever(AbsVLForRetrieval.from_pretrained(trained["export"]), ImageIndex.load(index))
    queries = [(caption, image.path.name) for image in images for caption in image.captions]
    results = retriever.search_batch([q for q, _ in queries], k=5, rerank=0)
    recall_at_5 = np.mean([any(h.path.name == name for h in hits) for (_, name), hits in zip(queries, results)])
    chance = 5 / len(images)
    assert recall_at_5 > 2.5 * chance, (recall_at_5, chance)


def test_reranking_does_not_lower_recall_at_1_on_the_test_split(trained, shapes_root):
    model = AbsVLForRetrieval.from_pretrained(trained["export"])
    images = load_karpathy(shapes_root / "dataset_shapes.json", ["val", "test"], shapes_root / "images")
    result = evaluate_retrieval(model, images, rerank_k=4, batch_size=8)
    for key in ("ir@1", "tr@1"):
        assert result["reranked"][key] >= result["contrastive"][key], result


def test_eval_command_prints_the_recall_table_and_writes_json(trained, shapes_root, tmp_path, capsys):
    out = tmp_path / "recall.json"
    code = main(
        [
            "eval",
            "retrieval",
            "--model",
            trained["export"],
            "--data",
            str(shapes_root / "dataset_shapes.json"),
            "--images",
            str(shapes_root / "images"),
            "--split",
            "test",
            "--k",
            "3",
            "--num-workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| contrastive |" in printed and "re-ranked top-3" in printed
    saved = json.loads(out.read_text())
    assert saved["rerank_k"] == 3 and saved["images"] == 4 and saved["captions"] == 20
    # without re-ranking only the contrastive ranking is reported, and it is the same
    code = main(
        [
            "eval",
            "retrieval",
            "--model",
            trained["export"],
            "--data",
            str(shapes_root / "dataset_shapes.json"),
            "--images",
            str(shapes_root / "images"),
            "--split",
            "test",
            "--no-rerank",
            "--num-workers",
            "0",
            "--out",
            str(tmp_path / "plain.json"),
        ]
    )
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert code == 0 and "reranked" not in plain and plain["contrastive"] == saved["contrastive"]


def test_evaluation_leaves_out_unreadable_images_and_lists_them(trained, shapes_root, tmp_path):
    model = AbsVLForRetrieval.from_pretrained(trained["export"])
    images = load_karpathy(shapes_root / "dataset_shapes.json", ["test"], shapes_root / "images")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    images = [*images[:3], type(images[0])(999, broken, ("a red circle.",), "test")]
    result = evaluate_retrieval(model, images, rerank_k=2, batch_size=4)
    assert result["images"] == 3 and result["captions"] == 15
    assert result["skipped"] == [(str(broken), result["skipped"][0][1])]


def test_evaluation_streams_the_images_and_scores_each_pair_as_the_model_does(trained, shapes_root, monkeypatch):
    from collections import Counter

    from absvl.data.image_files import ImageFiles
    from absvl.evaluation.retrieval import _pair_scores

    model = AbsVLForRetrieval.from_pretrained(trained["export"])
    images = load_karpathy(shapes_root / "dataset_shapes.json", ["val", "test"], shapes_root / "images")
    decoded = Counter()
    read = ImageFiles.__getitem__
    monkeypatch.setattr(ImageFiles, "__getitem__", lambda self, i: decoded.update([self.paths[i]]) or read(self, i))
    evaluate_retrieval(model, images, rerank_k=3, batch_size=2)
    # embedded once, then decoded once per re-ranking direction: no image set held in memory
    assert set(decoded.values()) == {3} and len(decoded) == len(images)

    # the pair scores, visited image by image, are the model's scores of those pairs
    paths = [str(im.path) for im in images]
    texts = model.tokenizer(
        ["a red circle.", "a blue square on the left.", "two green triangles."], padding=True, return_tensors="pt"
    )
    image_rows, text_rows = np.array([3, 0, 3, 1, 7, 0]), np.array([0, 1, 2, 2, 1, 0])
    scores = _pair_scores(
        model.eval(),
        paths,
        image_rows,
        lambda rows: (texts["input_ids"][rows], texts["attention_mask"][rows]),
        text_rows,
        batch_size=4,
        num_workers=0,
        accelerator=Accelerator(cpu=True),
        desc="test",
    )
    pixels = torch.stack([read(ImageFiles(paths, model.image_size), i)[1] for i in image_rows])
    with torch.no_grad():
        expected = model.rerank_score(pixels, texts["input_ids"][text_rows], texts["attention_mask"][text_rows])
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_eval_command_names_a_wrong_image_root(trained, shapes_root, capsys):
    code = main(
        [
            "eval",
            "retrieval",
            "--model",
            trained["export"],
            "--data",
            str(shapes_root / "dataset_shapes.json"),
            "--split",
            "test",
            "--num-workers",
            "0",
            "--images",
            str(shapes_root),  # the world's root, not its images/ (which it finds without --images)
        ]
    )
    assert code == 2
    assert "--images" in capsys.readouterr().err


def test_rerank_resorts_only_the_first_k_and_keeps_ties_in_contrastive_order():
    order = np.array([[3, 1, 2, 0], [0, 1, 2, 3]])
    scores = np.array([[0.1, 0.9, 0.5], [0.5, 0.5, 0.7]])
    assert _rerank(order, 3, scores).tolist() == [[1, 2, 3, 0], [2, 0, 1, 3]]


@pytest.mark.parametrize("hard", [True, False])
def test_negatives_are_never_the_pair_itself(shapes_root, hard):
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"img_size": 32},
        text_encoder=str(shapes_root / "text_encoder"),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
    )
    model = AbsVLForRetrieval(config).eval()
    texts = [f"a {c} circle." for c in ("red", "blue", "green", "cyan", "orange", "purple")]
    batch = model.processor(images=[np.full((32, 32, 3), 40 * i, np.uint8) for i in range(6)], text=texts)
    for _ in range(20):
        neg_image, neg_text = sample_negatives(
            model, batch["images"], batch["input_ids"], batch["attention_mask"], hard
        )
        assert (neg_image != torch.arange(6)).all() and (neg_text != torch.arange(6)).all()
    with pytest.raises(ValueError, match="at least 2"):
        sample_negatives(model, batch["images"][:1], batch["input_ids"][:1], batch["attention_mask"][:1])


def test_hard_negatives_follow_the_similarities(shapes_root):
    """With a large logit scale, the negative drawn for a caption is its most similar other image."""
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="vit_test_patch8",
        backbone_kwargs={"img_size": 32},
        text_encoder=str(shapes_root / "text_encoder"),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
        max_logit_scale=1e4,
    )
    model = AbsVLForRetrieval(config).eval()
    with torch.no_grad():
        model.contrastive.logit_scale.fill_(np.log(1e4))
    texts = [f"a {c} square." for c in ("red", "blue", "green", "cyan")]
    batch = model.processor(images=[np.full((32, 32, 3), 60 * i, np.uint8) for i in range(4)], text=texts)
    with torch.no_grad():
        sims = (
            model.encode_text(batch["input_ids"], batch["attention_mask"])
            @ model.encode_image_bottom_up(batch["images"]).t()
        )
    expected = sims.masked_fill(torch.eye(4, dtype=torch.bool), -2).argmax(1)
    neg_image, _ = sample_negatives(model, batch["images"], batch["input_ids"], batch["attention_mask"], hard=True)
    assert neg_image.tolist() == expected.tolist()


def test_retrieval_config_checks(shapes_root):
    paper = load_config("configs/flickr30k_absvit_base.yaml", [], RetrievalConfig)
    assert paper.train.rerank_k == 128 and paper.model.backbone == "absvit_base_patch16_224"
    with pytest.raises(ConfigError, match="model.prior_visual"):
        load_config("configs/shapes_retrieval.yaml", ["model.prior_visual=top_down"], RetrievalConfig)
    with pytest.raises(ConfigError, match="train.rerank_k"):
        load_config("configs/shapes_retrieval.yaml", ["train.rerank_k=0"], RetrievalConfig)
    with pytest.raises(ConfigError, match="did you mean 'data.captions'"):
        load_config("configs/shapes_retrieval.yaml", ["data.caption=x"], RetrievalConfig)


def test_an_epoch_of_only_unreadable_images_stops_the_run(shapes_root, tiny_model_overrides, tmp_path):
    """Corrupt every training image: the run stops after one epoch with a message, not hours later."""
    images = tmp_path / "images"
    for src in (shapes_root / "images").rglob("*.jpg"):
        dest = images / src.relative_to(shapes_root / "images")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"truncated")
    overrides = [
        *retrieval_overrides(shapes_root, tiny_model_overrides, tmp_path / "run", 50),
        f"data.images={images}",
        "data.val_split=null",
    ]
    with pytest.raises(ValueError, match="none of the 32 training items could be read"):
        train_retrieval(load_config("configs/shapes_retrieval.yaml", overrides, RetrievalConfig))
    with pytest.raises(FileNotFoundError, match="data.images"):
        train_retrieval(
            load_config("configs/shapes_retrieval.yaml", [*overrides, f"data.images={tmp_path}"], RetrievalConfig)
        )


def test_hard_negatives_are_mined_in_eval_mode(shapes_root):
    """No dropout and no BatchNorm update in the mining pass; the model's mode is restored."""
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="tdam_resnet_test",
        text_encoder=str(shapes_root / "text_encoder"),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
    )
    model = AbsVLForRetrieval(config).train()
    seen = []
    encode = model.encode_image_bottom_up
    model.encode_image_bottom_up = lambda images: seen.append(model.training) or encode(images)
    statistics = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    assert statistics  # the TDAM backbone has BatchNorm statistics
    texts = [f"a {c} circle." for c in ("red", "blue", "green")]
    batch = model.processor(images=[np.full((32, 32, 3), 50 * i, np.uint8) for i in range(3)], text=texts)
    sample_negatives(model, batch["images"], batch["input_ids"], batch["attention_mask"], hard=True)
    assert seen == [False] and model.training
    assert all(torch.equal(b, statistics[n]) for n, b in model.named_buffers() if n in statistics)


def test_training_and_evaluation_on_a_hugging_face_dataset(
    shapes_root, tiny_model_overrides, tmp_path, monkeypatch, capsys
):
    """A folder of split-named parquet files {img: image bytes, caption: [5 captions], cocoid}: a few training steps,
    then `absvl eval retrieval` on it scores exactly as on the Karpathy caption file with the same images."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    repo = tmp_path / "shapes-hf"
    repo.mkdir()
    features = datasets.Features(
        {"img": datasets.Image(), "caption": [datasets.Value("string")], "cocoid": datasets.Value("int64")}
    )
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        images = load_karpathy(shapes_root / "dataset_shapes.json", [split], shapes_root / "images")
        datasets.Dataset.from_dict(
            {
                "img": [{"bytes": im.path.read_bytes(), "path": None} for im in images],
                "caption": [list(im.captions) for im in images],
                "cocoid": [im.image_id for im in images],
            },
            features=features,
        ).to_parquet(repo / f"{name}-00000-of-00001.parquet")
    overrides = [
        *retrieval_overrides(shapes_root, tiny_model_overrides, tmp_path / "run", 4),
        "data.format=hf",
        f"data.captions={repo}",
        "data.images=null",
        "data.hf_columns={image: img}",
    ]
    summary = train_retrieval(load_config("configs/shapes_retrieval.yaml", overrides, RetrievalConfig))
    assert summary["step"] == 4 and summary["val"]["images"] == 4 and summary["val"]["captions"] == 20

    out = tmp_path / "recall.json"
    assert (
        main(
            [
                "eval",
                "retrieval",
                "--model",
                summary["export"],
                "--data",
                str(repo),
                "--column",
                "image=img",
                "--split",
                "test",
                "--k",
                "2",
                "--num-workers",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert f"of {repo} [test]" in capsys.readouterr().out
    hf = json.loads(out.read_text())
    karpathy = evaluate_retrieval_model(
        summary["export"],
        shapes_root / "dataset_shapes.json",
        "test",
        shapes_root / "images",
        rerank_k=2,
        num_workers=0,
    )
    assert (hf["images"], hf["captions"]) == (4, 20)
    assert hf["contrastive"] == karpathy["contrastive"] and hf["reranked"] == karpathy["reranked"]

    with pytest.raises(ConfigError, match="data.format"):
        load_config("configs/shapes_retrieval.yaml", ["data.format=csv"], RetrievalConfig)
    with pytest.raises(ConfigError, match="data.hf_columns"):
        load_config("configs/shapes_retrieval.yaml", ["data.hf_columns={image: img}"], RetrievalConfig)


def test_foils_join_the_itm_pairs_as_negatives_of_their_own_image(shapes_root, tiny_model_overrides, tmp_path):
    overrides = [*retrieval_overrides(shapes_root, tiny_model_overrides, tmp_path / "run", 2), "data.foils=true"]
    task = RetrievalTask(load_config("configs/shapes_retrieval.yaml", overrides, RetrievalConfig))
    task.setup(Accelerator(cpu=True), tmp_path, None)
    batch = task.collator([task.train_set[i] for i in range(6)])
    rows = batch["foil_rows"]
    assert len(rows) >= 5  # nearly every caption of the world has a foil
    seen, forward = {}, task.model.forward

    def recording(images, ids, mask, labels, image_index):
        seen.update(ids=ids, labels=labels, image_index=image_index)
        return forward(images, ids, mask, labels=labels, image_index=image_index)

    task.model.forward = recording
    loss = task.loss(task.model, batch)
    assert torch.isfinite(loss)
    # 6 pairs, 6 images with another caption, 6 captions with another image, then the foils with their own images
    assert seen["labels"].tolist() == [1] * 6 + [0] * (12 + len(rows))
    assert seen["image_index"][18:].tolist() == rows.tolist()
    assert torch.equal(seen["ids"][18:], batch["foil_ids"])

    plain = RetrievalTask(load_config("configs/shapes_retrieval.yaml", overrides[:-1], RetrievalConfig))
    plain.setup(Accelerator(cpu=True), tmp_path, None)
    assert "foil_rows" not in plain.collator([plain.train_set[i] for i in range(2)])


def test_foils_need_a_shapes_world(shapes_root, tiny_model_overrides, tmp_path):
    captions = tmp_path / "dataset_shapes.json"  # the world's captions, away from its scenes
    captions.write_text((shapes_root / "dataset_shapes.json").read_text())
    overrides = [
        *retrieval_overrides(shapes_root, tiny_model_overrides, tmp_path / "run", 2),
        f"data.captions={captions}",
        "data.foils=true",
    ]
    task = RetrievalTask(load_config("configs/shapes_retrieval.yaml", overrides, RetrievalConfig))
    with pytest.raises(ConfigError, match="data.foils=true: .* holds no Shapes world"):
        task.setup(Accelerator(cpu=True), tmp_path, None)
    with pytest.raises(ConfigError, match="data.foils"):
        load_config(
            "configs/shapes_retrieval.yaml", ["data.format=hf", "data.shapes=null", "data.foils=true"], RetrievalConfig
        )
