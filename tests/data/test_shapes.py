"""The Shapes world: determinism, masks, correct answers, official formats, captions, caching, atomicity."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from absvl.cli import main
from absvl.data import shapes, shapes_scene, shapes_text
from absvl.data.shapes import ensure_shapes, generate_shapes
from absvl.data.shapes_scene import COLORS, SHAPES, SIZES
from absvl.data.shapes_world import ShapesWorld, target_mask

N = 30
SPLITS = {"train2014": "train2014", "val2014": "val2014", "test-dev2015": "test2015"}  # split → image folder
KARPATHY = {"train2014": "train", "val2014": "val", "test-dev2015": "test"}
RELS = ("left of", "right of", "above", "below")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> ShapesWorld:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "world", num_images=N, seed=0, text_pretrain_steps=20)


def _load(path):
    return json.loads(Path(path).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(world):
    return {s["image_id"]: s for s in _load(world.scenes_path)["images"]}


def _qa(world):
    """(question entry, annotation, split) for every question of every split."""
    out = []
    for split in SPLITS:
        qs = _load(world.questions_path(split))["questions"]
        anns = {a["question_id"]: a for a in _load(world.annotations_path(split))["annotations"]}
        out += [(q, anns[q["question_id"]], split) for q in qs]
    return out


# --------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_and_other_seed_differs(world, tmp_path):
    again = generate_shapes(tmp_path / "again", num_images=N, seed=0, text_pretrain_steps=20)
    ours, theirs = _files(world.root), _files(again.root)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []
    for s in list(_scenes(world).values())[:5]:  # decoded pixels too
        a = np.asarray(Image.open(world.root / "images" / s["folder"] / s["file_name"]))
        b = np.asarray(Image.open(again.root / "images" / s["folder"] / s["file_name"]))
        assert np.array_equal(a, b)

    other = generate_shapes(tmp_path / "other", num_images=N, seed=1, text_encoder=False)
    assert other.scenes_path.read_bytes() != world.scenes_path.read_bytes()
    assert _load(other.questions_path("train2014")) != _load(world.questions_path("train2014"))


# --------------------------------------------------------------------------- scenes and masks
def _interior(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def test_masks_match_the_recorded_objects_and_the_image(world):
    palette = np.array(list(COLORS.values()))
    names = list(COLORS)
    scenes = _scenes(world)
    assert len(scenes) == N
    for scene in scenes.values():
        labels = np.asarray(Image.open(world.root / "masks" / scene["folder"] / scene["mask_file"]))
        image = np.asarray(Image.open(world.root / "images" / scene["folder"] / scene["file_name"]).convert("RGB"))
        assert labels.dtype == np.uint8 and labels.shape == image.shape[:2] == (world.image_size,) * 2
        objects = scene["objects"]
        assert 2 <= len(objects) <= 5
        assert set(np.unique(labels)) <= set(range(len(objects) + 1))
        for k, obj in enumerate(objects):
            assert obj["index"] == k and obj["label"] == k + 1
            assert obj["color"] in COLORS and obj["shape"] in SHAPES and obj["size"] in SIZES
            mask = labels == k + 1
            assert mask.sum() == obj["area"] > 0
            assert obj["area"] >= shapes_scene.MIN_VISIBLE * obj["full_area"]
            x0, y0, x1, y1 = obj["bbox"]
            ys, xs = np.nonzero(mask)
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            assert x0 <= obj["center"][0] < x1 and y0 <= obj["center"][1] < y1
            inner = _interior(mask)
            pixels = image[inner if inner.sum() >= 5 else mask].astype(int)
            median = np.median(pixels, axis=0)
            assert np.abs(median - obj["rgb"]).max() <= 25, (scene["image_id"], obj)
            assert names[int(np.abs(palette - median).sum(1).argmin())] == obj["color"]
        # background pixels look like the (light, neutral) background, not like an object
        bg = image[_interior(labels == 0)].astype(int)
        assert bg.min() >= 120


def test_target_mask_is_the_union_of_the_target_objects(world):
    qa = _qa(world)
    scenes = _scenes(world)
    with_targets = [q for q, _, _ in qa if q["target_objects"]]
    assert with_targets and any(not q["target_objects"] for q, _, _ in qa)
    for q in with_targets[:20] + [q for q, _, _ in qa if not q["target_objects"]][:3]:
        scene = scenes[q["image_id"]]
        labels = np.asarray(Image.open(world.root / "masks" / scene["folder"] / scene["mask_file"]))
        expected = np.isin(labels, [i + 1 for i in q["target_objects"]])
        got = target_mask(world, q)
        assert got.dtype == bool and np.array_equal(got, expected)
        assert np.array_equal(target_mask(world.root, q["question_id"]), expected)
        assert np.array_equal(target_mask(str(world.root), {"question_id": q["question_id"]}), expected)


# --------------------------------------------------------------------------- answers are right
def _parse_desc(text: str, plural: bool = False):
    words = text.split()
    noun = words[-1]
    if plural:
        assert noun.endswith("s")
        noun = noun[:-1]
    size = color = None
    for w in words[:-1]:
        if w in SIZES:
            size = w
        else:
            assert w in COLORS, text
            color = w
    shape = None if noun == "object" else noun
    assert shape is None or shape in SHAPES, text
    return size, color, shape


def _matching(objects, desc):
    size, color, shape = desc
    return [
        o["index"]
        for o in objects
        if (size in (None, o["size"])) and (color in (None, o["color"])) and (shape in (None, o["shape"]))
    ]


def _rel(a, b, rel, margin):
    (ax, ay), (bx, by) = a["center"], b["center"]
    d = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    return True if d >= margin else False if d <= 0 else None


def _unique(objects, text):
    found = _matching(objects, _parse_desc(text))
    assert len(found) == 1, f"ambiguous reference {text!r}"
    return objects[found[0]]


def _check(q, a, objects, margin):
    """Recompute the answer, type and targets of a question from the scene."""
    text = q["question"]
    rel_re = "|".join(RELS)
    if m := re.fullmatch(rf"what (color|shape) is the object ({rel_re}) the (.+)\?", text):
        attr, rel, ref = m.groups()
        b = _unique(objects, ref)
        verdicts = {o["index"]: _rel(o, b, rel, margin) for o in objects if o is not b}
        assert None not in verdicts.values() and list(verdicts.values()).count(True) == 1
        target = objects[[i for i, v in verdicts.items() if v][0]]
        return target[attr], f"what {attr} is the", "other", [target["index"], b["index"]]
    if m := re.fullmatch(r"what (color|shape) is the (.+)\?", text):
        attr, ref = m.groups()
        desc = _parse_desc(ref)
        assert desc[1 if attr == "color" else 2] is None, "the question gives its answer away"
        o = _unique(objects, ref)
        return o[attr], f"what {attr} is the", "other", [o["index"]]
    if m := re.fullmatch(r"is there an? (.+)\?", text):
        found = _matching(objects, _parse_desc(m.group(1)))
        return ("yes" if found else "no"), "is there a", "yes/no", found
    if m := re.fullmatch(r"how many (.+) are there\?", text):
        found = _matching(objects, _parse_desc(m.group(1), plural=True))
        return str(len(found)), "how many", "number", found
    if m := re.fullmatch(rf"is the (.+) ({rel_re}) the (.+)\?", text):
        ref_a, rel, ref_b = m.groups()
        oa, ob = _unique(objects, ref_a), _unique(objects, ref_b)
        verdict = _rel(oa, ob, rel, margin)
        assert verdict is not None and oa is not ob
        return ("yes" if verdict else "no"), "is the", "yes/no", [oa["index"], ob["index"]]
    raise AssertionError(f"unknown template {text!r}")


def test_every_answer_is_correct_for_its_scene(world):
    scenes = _scenes(world)
    margin = _load(world.scenes_path)["relation_margin"]
    seen = Counter()
    for q, a, _ in _qa(world):
        answer, qtype, atype, targets = _check(q, a, scenes[q["image_id"]]["objects"], margin)
        assert a["multiple_choice_answer"] == answer, q
        assert (a["question_type"], a["answer_type"]) == (qtype, atype), q
        assert sorted(q["target_objects"]) == sorted(targets), q
        assert Counter(x["answer"] for x in a["answers"])[answer] >= 7
        seen[q["question"].split()[0] + " " + q["question"].split()[1]] += 1
    # all templates occur: what color / what shape / is there / how many / is the (relations)
    assert {"what color", "what shape", "is there", "how many", "is the"} <= set(seen)


def test_question_family_reads_every_template_back():
    rng = np.random.default_rng(0)
    margin = 6.0
    for seed in range(20):
        _, _, objects, _ = shapes_scene.make_scene(np.random.default_rng(seed), 64, 2, 5)
        for family in shapes_text.FAMILIES:
            for candidate in shapes_text.question_candidates(objects, family, margin, rng):
                assert shapes_text.question_family(candidate["question"]) == family, candidate["question"]
                # the objects a question's words describe: all of its objects but a relational question's answer
                if family == "rel_what":
                    (named,) = candidate["named"]
                    noun = candidate["question"].rstrip("?").split()[-1]  # "... left of the red circle?"
                    assert named == candidate["targets"][1] and noun in (objects[named]["shape"], "object")
                else:
                    assert candidate["named"] == candidate["targets"]
    assert shapes_text.question_family("what is the man holding?") is None
    # "what color is the" holds two families: the relational one names no attribute of its object
    assert shapes_text.question_family("what color is the object left of the red circle?") == "rel_what"
    assert shapes_text.question_family("what color is the large object?") == "color"


def test_answers_are_spread_and_human_answers_are_noisy(world):
    qa = _qa(world)
    by_type = Counter(a["answer_type"] for _, a, _ in qa)
    assert set(by_type) == {"yes/no", "number", "other"}
    yn = Counter(a["multiple_choice_answer"] for _, a, _ in qa if a["answer_type"] == "yes/no")
    assert abs(yn["yes"] - yn["no"]) <= 2
    majority = Counter(a["multiple_choice_answer"] for _, a, _ in qa).most_common(1)[0][1]
    assert majority / len(qa) < 0.3
    noisy = sum(len({x["answer"] for x in a["answers"]}) > 1 for _, a, _ in qa)
    assert 0 < noisy < len(qa)


# --------------------------------------------------------------------------- official formats
def test_vqav2_files_follow_the_official_format(world):
    root = world.root
    qids = []
    for split, folder in SPLITS.items():
        qfile = _load(root / f"v2_OpenEnded_mscoco_{split}_questions.json")
        assert {"info", "task_type", "data_type", "data_subtype", "license", "questions"} <= qfile.keys()
        assert qfile["task_type"] == "Open-Ended" and qfile["data_type"] == "mscoco" and qfile["data_subtype"] == split
        test = split.startswith("test")
        public = root / f"v2_mscoco_{split}_annotations.json"
        assert public.exists() != test
        assert (root / f"shapes_{split}_annotations.json").exists() == test
        afile = _load(world.annotations_path(split))
        assert afile["data_subtype"] == split and {"info", "annotations"} <= afile.keys()
        anns = {a["question_id"]: a for a in afile["annotations"]}
        assert len(anns) == len(qfile["questions"]) == world.num_questions[split] > 0
        for q in qfile["questions"]:
            assert {"image_id", "question", "question_id", "target_objects"} <= q.keys()
            assert type(q["image_id"]) is int and type(q["question_id"]) is int and isinstance(q["question"], str)
            assert q["question_id"] // 1000 == q["image_id"] and q["question"].endswith("?")
            assert all(type(i) is int for i in q["target_objects"])
            a = anns[q["question_id"]]
            assert a["image_id"] == q["image_id"]
            assert a["answer_type"] in {"yes/no", "number", "other"}
            assert a["question_type"] in {"what color is the", "what shape is the", "is there a", "how many", "is the"}
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer_confidence"] == "yes" and isinstance(x["answer"], str) for x in a["answers"])
            answers = Counter(x["answer"] for x in a["answers"])
            assert a["multiple_choice_answer"] == answers.most_common(1)[0][0]
            if a["answer_type"] == "number":
                assert all(x.isdigit() for x in answers)
            image = root / "images" / folder / f"COCO_{folder}_{q['image_id']:012d}.jpg"
            assert image.is_file()
            qids.append(q["question_id"])
    assert len(qids) == len(set(qids))


def test_images_use_coco_names_and_split_folders(world):
    scenes = _scenes(world)
    counts = Counter(s["split"] for s in scenes.values())
    assert counts == {"train2014": 24, "val2014": 3, "test-dev2015": 3} == world.splits
    for folder in SPLITS.values():
        files = sorted((world.root / "images" / folder).iterdir())
        assert files and all(re.fullmatch(rf"COCO_{folder}_\d{{12}}\.jpg", p.name) for p in files)
    for s in scenes.values():
        assert s["folder"] == SPLITS[s["split"]]
        with Image.open(world.root / "images" / s["folder"] / s["file_name"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (world.image_size,) * 2
    images_per_split = {s: {q["image_id"] for q in _load(world.questions_path(s))["questions"]} for s in SPLITS}
    assert images_per_split == {s: {i for i, sc in scenes.items() if sc["split"] == s} for s in SPLITS}


def test_karpathy_captions(world):
    data = _load(world.karpathy_path)
    assert data["dataset"] == "shapes"
    scenes = _scenes(world)
    sentids = []
    assert len(data["images"]) == N
    for i, im in enumerate(data["images"]):
        scene = scenes[im["cocoid"]]
        assert im["imgid"] == i and im["filename"] == scene["file_name"] and im["filepath"] == scene["folder"]
        assert im["split"] == KARPATHY[scene["split"]]
        sents = im["sentences"]
        assert len(sents) == 5 and len({s["raw"] for s in sents}) == 5
        assert im["sentids"] == [s["sentid"] for s in sents]
        for s in sents:
            assert s["imgid"] == i
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower()) and s["tokens"]
            for obj_word in re.findall(rf"({'|'.join(SHAPES)})s?\b", s["raw"]):
                assert any(o["shape"] == obj_word for o in scene["objects"]), (s["raw"], scene["objects"])
            for color in COLORS:
                if re.search(rf"\b{color}\b", s["raw"]):
                    assert any(o["color"] == color for o in scene["objects"])
        sentids += im["sentids"]
    assert len(sentids) == len(set(sentids))


def test_text_encoder_loads_and_tokenizes(world):
    import torch
    from transformers import AutoModel, AutoTokenizer

    assert world.text_encoder_dir == world.root / "text_encoder"
    tok = AutoTokenizer.from_pretrained(world.text_encoder_dir)
    model = AutoModel.from_pretrained(world.text_encoder_dir).eval()
    q = _load(world.questions_path("train2014"))["questions"][0]["question"]
    batch = tok([q, "a small red circle left of a large blue square."], padding=True, return_tensors="pt")
    assert tok.unk_token_id not in batch["input_ids"][0].tolist()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape[:2] == batch["input_ids"].shape and torch.isfinite(out).all()
    captions = [s["raw"] for im in _load(world.karpathy_path)["images"] for s in im["sentences"]]
    assert max(len(tok(c)["input_ids"]) for c in captions) <= model.config.max_position_embeddings - 2


# --------------------------------------------------------------------------- caching and atomicity
def test_ensure_reuses_a_complete_world_and_regenerates_on_changes(tmp_path):
    out = tmp_path / "w"
    kw = dict(num_images=12, text_encoder=False)
    first = ensure_shapes(out, **kw)
    probe = out / "images" / "train2014" / sorted(p.name for p in (out / "images" / "train2014").iterdir())[0]
    stamps = (first.meta_path.stat().st_mtime_ns, probe.stat().st_mtime_ns, first.scenes_path.stat().st_mtime_ns)
    first_scenes = first.scenes_path.read_bytes()

    again = ensure_shapes(out, **kw)
    assert again == first
    assert (
        again.meta_path.stat().st_mtime_ns,
        probe.stat().st_mtime_ns,
        again.scenes_path.stat().st_mtime_ns,
    ) == stamps

    changed = ensure_shapes(out, **{**kw, "seed": 3})
    assert changed.seed == 3 and _load(changed.meta_path)["args"]["seed"] == 3
    assert changed.scenes_path.read_bytes() != first_scenes

    victim = next((out / "masks" / "val2014").iterdir())
    victim.unlink()  # a missing file triggers a regeneration
    repaired = ensure_shapes(out, **{**kw, "seed": 3})
    assert victim.exists()
    assert _load(repaired.meta_path) == _load(changed.meta_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-w-", ".old-w"))] == []


def test_interrupted_generation_leaves_no_world(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shapes.captions

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    out = tmp_path / "w"
    monkeypatch.setattr(shapes, "captions", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_shapes(out, num_images=12, text_encoder=False)
    assert not out.exists() and not (out / "shapes_meta.json").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    # an existing world survives a failed regeneration untouched
    monkeypatch.setattr(shapes, "captions", real)
    world = ensure_shapes(out, num_images=12, text_encoder=False)
    before = _files(out)
    calls["n"] = 0
    monkeypatch.setattr(shapes, "captions", failing)
    with pytest.raises(RuntimeError):
        ensure_shapes(out, num_images=12, seed=5, text_encoder=False)
    assert _files(out) == before and world.seed == 0


def test_refuses_to_replace_a_foreign_folder_and_validates_splits(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_shapes(foreign, num_images=4, text_encoder=False)
    assert (foreign / "notes.txt").read_text() == "keep me"

    world = generate_shapes(
        tmp_path / "counts",
        num_images=None,
        splits=(("train2014", 4), ("val2014", 2)),
        text_encoder=False,
        questions_per_image=3,
    )
    assert world.splits == {"train2014": 4, "val2014": 2} and world.num_questions == {"train2014": 12, "val2014": 6}
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / "bad", num_images=10, splits=(("train2014", 0.5), ("val2014", 0.4)))
    with pytest.raises(ValueError):
        generate_shapes(tmp_path / "bad", num_images=10, splits=(("minival", 1.0),))


def test_the_generator_writes_only_into_its_own_folder_and_says_where(tmp_path, capsys):
    # a misspelt data.root with data.shapes set generated a world wherever it pointed (files under /)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match=r"does not exist, nor does its parent .*misspelt.*create .*dtaa first"):
        ensure_shapes(tmp_path / "dtaa" / "shapes", num_images=4, text_encoder=False)
    assert not (tmp_path / "dtaa").exists()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file"):
        generate_shapes(tmp_path / "notes.txt", num_images=4, text_encoder=False)
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="is not empty and is not a Shapes world; refusing to write into it"):
        ensure_shapes(foreign, num_images=4, text_encoder=False)
    assert capsys.readouterr().err == ""
    assert main(["data", "shapes", "--out", str(foreign), "--images", "4"]) == 2
    assert capsys.readouterr().err.startswith(f"absvl: error: {foreign} exists, is not empty")
    # nothing was written by the refusals: no world, no lock file, no staging folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "notes.txt", "mine"])
    assert [p.name for p in foreign.iterdir()] == ["sub"]

    world = ensure_shapes(tmp_path / "w", num_images=4, text_encoder=False, questions_per_image=2)
    assert f"generating a Shapes world (4 images, seed 0) in {world.root.resolve()} (a new folder)" in (
        capsys.readouterr().err
    )
    ensure_shapes(tmp_path / "w", num_images=4, text_encoder=False, questions_per_image=2)
    assert capsys.readouterr().err == ""  # reused: nothing written, nothing said
    generate_shapes(tmp_path / "w", num_images=4, seed=1, text_encoder=False, questions_per_image=2)
    assert f"seed 1) in {world.root.resolve()} (replacing the Shapes world there)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    generate_shapes(tmp_path / "empty", num_images=4, text_encoder=False, questions_per_image=2)
    assert "(an empty folder)" in capsys.readouterr().err


def test_stale_staging_folders_are_cleared(tmp_path):
    # left by a run killed mid-generation (io.atomic_folder's ``.tmp-NAME-*``; ``.NAME.tmp-*`` of absvl <= 0.2)
    stale = [tmp_path / ".tmp-w-abc123", tmp_path / ".w.tmp-xyz"]
    for folder in stale:
        (folder / "images").mkdir(parents=True)
    world = generate_shapes(tmp_path / "w", num_images=4, text_encoder=False, questions_per_image=2)
    assert ShapesWorld.exists(world.root) and not any(folder.exists() for folder in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # nothing beside the world, not even a lock file


def test_relation_margin_and_mask_of_read_the_world(world):
    # the margin the questions' spatial relations were generated with (a tenth of the image, at least 2 px)
    assert world.relation_margin == float(_load(world.scenes_path)["relation_margin"])
    assert world.relation_margin == max(2.0, round(0.1 * world.image_size))
    for scene in _scenes(world).values():
        image = world.image_path(scene["split"], scene["image_id"])
        mask = world.mask_of(image, scene["image_id"])
        assert mask == world.mask_path(scene["split"], scene["image_id"]) and mask.is_file()
        assert np.asarray(Image.open(mask)).shape == (world.image_size,) * 2
        # the image's folder names the split, wherever the images are kept (data.images)
        moved = Path("/elsewhere/coco") / scene["folder"] / scene["file_name"]
        assert world.mask_of(str(moved), str(scene["image_id"])) == mask
