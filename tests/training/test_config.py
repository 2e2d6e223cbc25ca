import pytest

from absvl.training.config import ConfigError, RunConfig, dump_config, load_config


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_repo_configs_load():
    for name in ("vqav2_absvit_base", "vqav2_vit_base", "shapes_absvit_tiny"):
        config = load_config(f"configs/{name}.yaml")
        assert config.train.lr > 0
    paper = load_config("configs/vqav2_absvit_base.yaml")
    assert paper.model.backbone == "absvit_base_patch16_224" and paper.model.alpha == 10
    assert paper.train.batch_size * 8 * paper.train.grad_accum == 512 and paper.train.epochs == 10
    assert load_config("configs/vqav2_vit_base.yaml").model.backbone == "vit_base_patch16_224"


def test_overrides_parse_values_and_reach_every_section(tmp_path):
    config = load_config(
        _write(tmp_path, "train: {lr: 1.0e-4}\n"),
        [
            "train.lr=2e-5",
            "train.betas=[0.9, 0.99]",
            "model.alpha=1",
            "data.train_splits=[train, val]",
            "train.resume=latest",
        ],
    )
    assert config.train.lr == 2e-5 and config.train.betas == [0.9, 0.99]
    assert config.model.alpha == 1 and config.data.train_splits == ["train", "val"] and config.train.resume == "latest"
    assert load_config(None).train.lr == 1e-5  # defaults


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train: {lrr: 1}\n", [], r"unknown config key 'train.lrr' in .*run.yaml \(did you mean 'train.lr'\?\)"),
        ("trian: {lr: 1}\n", [], r"unknown config key 'trian' .*did you mean 'train'"),
        ("", ["model.alpah=3"], r"unknown config key 'model.alpah' in the command line .*'model.alpha'"),
        ("", ["train.lr"], r"not of the form section.key=value"),
        ("", ["lr=3"], r"must start with one of model, data, train"),
        ("", ["train.lr=abc"], r"train.lr='abc' .* is not a number"),
        ("", ["train.mixed_precision=fp8"], r"train.mixed_precision='fp8' is invalid"),
        ("", ["model.prior_pooling=max"], r"bad model config .*prior_pooling='max'"),
        ("train: [1, 2]\n", [], r"section 'train' .* must be a mapping"),
        ("", ["train.log_every=0"], r"train.log_every=0 is invalid: expected > 0"),
        ("", ["train.keep_last=-1"], r"train.keep_last=-1 is invalid"),
        ("", ["train.batch_size=2.5"], r"train.batch_size=2.5 in the command line is invalid: expected a whole number"),
        ("", ["train.vision_from_scratch=maybe"], r"train.vision_from_scratch='maybe' .* expected true or false"),
        ("", ["train.lr_multipliers=[1, 2]"], r"train.lr_multipliers=\[1, 2\] .* expected a mapping"),
        ("", ["train.lr_multipliers={backbone: fast}"], r"train.lr_multipliers.backbone='fast' .* is not a number"),
        ("", ["train.trackers=null"], r"train.trackers=None .* expected a list"),
        ("", ["train.betas=[0.9, {a: 1}]"], r"train.betas\[1\]=\{'a': 1\} .* expected a number"),
        ("train: {lr: [\n", [], r"is not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), overrides)


def test_values_take_their_field_types():
    config = load_config(
        None,
        [
            "train.trackers=wandb",
            "train.max_steps=1e3",
            "train.lr=1",
            "model.text_encoder=123",
            "train.resume=null",
            "train.vision_from_scratch=true",
        ],
    )
    assert config.train.trackers == ["wandb"]  # one tracker is a list of one
    assert config.train.max_steps == 1000 and isinstance(config.train.max_steps, int)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert (
        config.model.text_encoder == "123" and config.train.resume is None and config.train.vision_from_scratch is True
    )


def test_a_flag_is_true_or_false_and_the_error_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data.randaugment='maybe' in the command line .* expected true or false"):
        load_config(None, ["data.randaugment=maybe"])
    with pytest.raises(ConfigError, match=r"data.randaugment='maybe' in .*run.yaml .* expected true or false"):
        load_config(_write(tmp_path, "data: {randaugment: maybe}\n"))


def test_missing_file_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    config = load_config("configs/vqav2_absvit_base.yaml", ["train.lr=3e-5"])
    again = load_config(_write(tmp_path, dump_config(config)))
    assert again == config


def test_paper_size_vision_from_scratch_is_refused_unless_asked_for():
    from absvl.training.config import RetrievalConfig, check_vision_start

    for path, run_class in (
        ("configs/vqav2_absvit_base.yaml", RunConfig),
        ("configs/flickr30k_absvit_base.yaml", RetrievalConfig),
    ):
        check_vision_start(load_config(path, [], run_class))  # the paper configs start from ImageNet weights
        scratch = load_config(path, ["model.backbone_kwargs={}"], run_class)  # loads (e.g. for evaluation) ...
        with pytest.raises(
            ConfigError,
            match=r"no pretrained weights for the paper-size vision backbone.*"
            r"train.vision_from_scratch=true",
        ):
            check_vision_start(scratch)  # ... but does not train
        for fix in (
            "train.vision_from_scratch=true",
            "model.backbone_kwargs={pretrained_path: weights/absvit_base}",
            "train.init_from=runs/x/final",
        ):
            check_vision_start(load_config(path, ["model.backbone_kwargs={}", fix], run_class))
    check_vision_start(
        load_config("configs/vqav2_absvit_base.yaml", ["model.backbone=absvit_test_patch8", "model.backbone_kwargs={}"])
    )


def test_training_refuses_a_scratch_paper_size_backbone_before_any_work(tmp_path):
    from absvl.training.vqa import train_vqa

    config = load_config(
        "configs/vqav2_absvit_base.yaml", ["model.backbone_kwargs={}", f"train.output_dir={tmp_path / 'run'}"]
    )
    with pytest.raises(ConfigError, match="paper-size vision backbone"):
        train_vqa(config)
    assert not (tmp_path / "run").exists()


def test_yaml_words_yes_no_on_off_stay_words():
    """YAML 1.2 booleans: ``mixed_precision=no`` is Accelerate's "no", not False; a flag wants true/false."""
    config = load_config("configs/shapes_absvit_tiny.yaml", ["train.mixed_precision=no", "data.randaugment=True"])
    assert config.train.mixed_precision == "no" and config.data.randaugment is True
    with pytest.raises(
        ConfigError, match="data.randaugment='yes' in the command line is invalid: expected true or false"
    ):
        load_config("configs/shapes_absvit_tiny.yaml", ["data.randaugment=yes"])


def test_background_weight_is_a_positive_weight_of_patch_labels():
    from absvl.training.config import ClassifyConfig

    patches = ["data.format=patches", "data.mixup=0", "data.cutmix=0", "data.randaugment=null"]
    assert load_config(None, [], ClassifyConfig).data.background_weight == 1.0  # off by default
    assert load_config(None, [*patches, "data.background_weight=0.1"], ClassifyConfig).data.background_weight == 0.1
    for bad in ("0", "-0.5"):
        with pytest.raises(ConfigError, match=rf"data.background_weight={float(bad)!r} is invalid: expected > 0"):
            load_config(None, [*patches, f"data.background_weight={bad}"], ClassifyConfig)
    with pytest.raises(ConfigError, match=r"data.background_weight='heavy' .* is not a number"):
        load_config(None, [*patches, "data.background_weight=heavy"], ClassifyConfig)
    # image labels have no background class: the error names the key to change and the one that needs it
    with pytest.raises(
        ConfigError, match=r"data.format='imagefolder' is invalid: expected patches for data.background_weight"
    ):
        load_config(None, ["data.background_weight=0.5"], ClassifyConfig)
    # keeping decoded images needs items that are the same every epoch: patch labels, not random crops
    assert load_config(None, [*patches, "data.cache_images=true"], ClassifyConfig).data.cache_images
    with pytest.raises(
        ConfigError, match=r"data.format='imagefolder' is invalid: expected patches for data.cache_images"
    ):
        load_config(None, ["data.cache_images=true"], ClassifyConfig)


def test_the_shapes_recipe_configs_load():
    from absvl.training.config import ClassifyConfig

    pretrain = load_config("configs/shapes_pretrain.yaml", [], ClassifyConfig)
    assert pretrain.data.format == "patches" and 0 < pretrain.data.background_weight < 1
    prior = load_config("configs/shapes_prior.yaml")  # a VQA run config (absvl train prior)
    assert prior.model.prior_object_weight > 0 and prior.data.root == "data/shapes"


def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path):
    # PyYAML keeps the last silently: a second lr would win, a second train: section would replace the first whole
    text = "train:\n  lr: 1.0e-4\n  output_dir: runs/mine\n  lr: 100.0\n"
    with pytest.raises(ConfigError, match=r"run.yaml: key 'lr' appears twice in one mapping, on line 2 and on line 4"):
        load_config(_write(tmp_path, text))
    text = "train:\n  lr: 1.0e-4\n  output_dir: runs/mine\nmodel: {alpha: 1}\ntrain:\n  epochs: 2\n"
    with pytest.raises(ConfigError, match=r"key 'train' appears twice in one mapping, on line 1 and on line 5"):
        load_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"key 'alpha' appears twice .* on line 1 \(columns 9 and 19\)"):
        load_config(_write(tmp_path, "model: {alpha: 1, alpha: 2}\n"))
    with pytest.raises(ConfigError, match=r"train.betas=.*not valid YAML .*key 'a' appears twice"):
        load_config(None, ["train.betas={a: 1, a: 2}"])
    # a merge key's keys may be overridden: that is no duplicate
    merged = "x: &base {lr: 1.0e-4, epochs: 2}\ntrain:\n  <<: *base\n  lr: 3.0e-5\n"
    from absvl.training.config import _load_yaml

    assert _load_yaml(merged)["train"] == {"lr": 3.0e-5, "epochs": 2}


def test_a_test_size_backbone_from_random_weights_is_told_what_to_run_first():
    from absvl.training.config import from_scratch_note

    config = load_config("configs/shapes_absvit_tiny.yaml", ["model.backbone_kwargs={img_size: 64}"])
    note = from_scratch_note(config)
    assert note is not None and "learns colour but not shape" in note
    assert "absvl train classify --config configs/shapes_pretrain.yaml" in note and "absvl train prior" in note
    # weights from stage 1 or from an export: nothing to say
    assert from_scratch_note(load_config("configs/shapes_absvit_tiny.yaml")) is None
    started = load_config("configs/shapes_absvit_tiny.yaml", ["model.backbone_kwargs={}", "train.init_from=runs/x"])
    assert from_scratch_note(started) is None
    # a paper-size backbone is refused by check_vision_start instead, not warned about
    paper = load_config("configs/vqav2_absvit_base.yaml", ["model.backbone_kwargs={}"])
    assert from_scratch_note(paper) is None


def test_train_vqa_warns_a_test_size_backbone_from_random_weights(tiny_overrides):
    from absvl.training.vqa import train_vqa

    config = load_config(
        "configs/shapes_absvit_tiny.yaml", [*tiny_overrides, "train.max_steps=1", "model.prior_object_weight=0"]
    )
    with pytest.warns(UserWarning, match="starts from random weights"):
        train_vqa(config)
