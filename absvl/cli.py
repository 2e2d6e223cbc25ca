"""The ``absvl`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._version import __version__
from .model_commands import add_commands as add_model_folder_commands
from .retrieval.commands import add_commands as add_retrieval_commands
from .runtime import is_main_process
from .serve.commands import add_commands as add_serve_commands


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .models.vision import backbone_family, count_params, create_backbone, estimate_macs, list_backbones

    names = list_backbones(args.family)
    if not names:
        print(f"no backbone in family {args.family!r}", file=sys.stderr)
        return 2
    header = f"{'name':36s} {'family':8s} {'params (M)':>10s}"
    header += f" {'GMACs@' + str(args.img_size):>11s}" if not args.no_macs else ""
    print(header)
    for name in names:
        if args.no_macs:
            row = f"{name:36s} {backbone_family(name):8s} {count_params(create_backbone(name)) / 1e6:10.2f}"
        else:
            params, macs = estimate_macs(name, img_size=args.img_size)
            row = f"{name:36s} {backbone_family(name):8s} {params / 1e6:10.2f} {macs / 1e9:11.2f}"
        print(row)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(args.config, args.overrides, args.out, retrieval_overrides=None if args.skip_retrieval else ())
    return 0


def _run_config(args: argparse.Namespace, run_class: type | None = None):
    """The run config of a command: ``--config`` and the overrides, and for ``--resume`` the run.

    ``--resume`` alone continues the latest checkpoint of the config's ``train.output_dir``;
    ``--resume RUN`` (a run folder or one of its checkpoints) continues that run with the run's own
    ``config.yaml`` unless ``--config`` is given. A ``key=value`` right after ``--resume`` is an
    override (argparse hands it to the optional value), not a checkpoint path.
    """

    from .training.checkpoint import STATE_NAME
    from .training.config import RunConfig, load_config

    config, overrides, resume = args.config, list(args.overrides), getattr(args, "resume", None)
    if resume and "=" in resume and not Path(resume).exists():
        overrides, resume = [resume, *overrides], "latest"
    if resume and resume != "latest":
        run = Path(resume)
        if (run / STATE_NAME).is_file():  # a checkpoint: its run is the folder above
            run = run.parent
        elif not (run / "config.yaml").is_file():
            raise FileNotFoundError(
                f"--resume {resume}: neither a run folder (with config.yaml) nor a checkpoint (with {STATE_NAME})"
            )
        else:
            resume = "latest"
        config = config or run / "config.yaml"
        overrides.insert(0, f"train.output_dir={run}")  # the run's own may be relative to another folder
    elif config is None and getattr(args, "needs_config", False):
        raise ValueError("give --config (a run config YAML), or --resume RUN to continue a run with its own config")
    if resume:
        overrides.append(f"train.resume={resume}")
    return load_config(config, overrides, run_class or RunConfig)


def _cmd_train_vqa(args: argparse.Namespace) -> int:
    from .training.vqa import train_vqa

    summary = train_vqa(_run_config(args), notify=print)
    return _report_training(summary, lambda val: f"validation accuracy {val['overall']:.2f}")


def _cmd_train_prior(args: argparse.Namespace) -> int:
    from .training.prior import train_prior

    summary = train_prior(_run_config(args), notify=print)
    return _report_training(
        summary,
        lambda val: (
            f"validation prior loss {val['prior_loss']:.4f}"
            + (f", gate pointing {val['gate_pointing']:.1f} %" if "gate_pointing" in val else "")
        ),
    )


def _cmd_train_retrieval(args: argparse.Namespace) -> int:
    from .training.config import RetrievalConfig
    from .training.retrieval import train_retrieval

    summary = train_retrieval(_run_config(args, RetrievalConfig), notify=print)
    return _report_training(
        summary,
        lambda val: (
            f"validation recall (re-ranked): R mean {val['reranked']['r_mean']:.2f}, "
            f"IR@1 {val['reranked']['ir@1']:.2f}, TR@1 {val['reranked']['tr@1']:.2f}"
        ),
    )


def _report_training(summary: dict, describe_val) -> int:
    """The closing lines of a training command, printed once per multi-process run."""
    if not is_main_process():
        return 0
    if summary["val"]:
        print(f"{describe_val(summary['val'])} at step {summary['step']}")
    print(f"model exported to {summary['export']}")
    return 0


def _write_json(path: str | None, payload) -> None:

    from .io import write_json

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, payload)
        print(f"wrote {path}")


def _cmd_eval_vqa(args: argparse.Namespace) -> int:
    from .data.answer_processing import DEFAULT_REVISION
    from .data.shapes_text import question_templates
    from .data.shapes_world import ShapesWorld
    from .metrics.vqa import accuracy_by_group, evaluate_vqa_files, format_accuracy_table

    if args.predictions:
        if not (args.questions and args.annotations):
            print("--predictions needs --questions and --annotations", file=sys.stderr)
            return 2
        result = evaluate_vqa_files(
            args.predictions, args.questions, args.annotations, revision=args.metric_revision or DEFAULT_REVISION
        )
    else:
        if args.metric_revision not in (None, DEFAULT_REVISION):
            print("--metric-revision applies to --predictions only", file=sys.stderr)
            return 2
        if not (args.model and (args.data or args.config)):
            print("give --model and --data (or --config), or --predictions/--questions/--annotations", file=sys.stderr)
            return 2
        from .evaluation.vqa import evaluate_vqa_model
        from .training.vqa import load_split

        config = _run_config(args)
        examples = load_split(config, args.split)
        result, _ = evaluate_vqa_model(args.model, examples, args.batch_size, config.data.num_workers)
        if result["skipped"]:
            print(f"{result['skipped']} questions skipped (unreadable images): they score 0")
        if ShapesWorld.exists(config.data.root):  # the world's questions also by the family of their template
            result["perFamily"] = accuracy_by_group(
                result, question_templates((ex.question_id, ex.question) for ex in examples)
            )
    print(format_accuracy_table(result))
    kept = ("overall", "perAnswerType", "perQuestionType", "perFamily", "skipped")
    _write_json(args.out, {k: v for k, v in result.items() if k in kept})
    return 0


def _field_column(text: str) -> tuple[str, str]:
    field, _, column = text.partition("=")
    if not (field and column):
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=COLUMN (e.g. captions=sentences)")
    return field, column


def _add_column_argument(p: argparse.ArgumentParser, fields: str) -> None:
    """``--column FIELD=COLUMN`` (repeatable): a Hugging Face dataset's column for a field it names otherwise."""
    p.add_argument(
        "--column",
        type=_field_column,
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help=f"Hugging Face: the dataset's column for a field ({fields}) it names otherwise, e.g. "
        "--column captions=sentences; repeatable (as data.hf_columns)",
    )


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from .evaluation.retrieval import evaluate_retrieval_model
    from .metrics.retrieval import format_recall_table
    from .metrics.scene_retrieval import format_scene_report

    result = evaluate_retrieval_model(
        args.model,
        args.data,
        args.split,
        args.images,
        rerank_k=args.k,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        rerank=not args.no_rerank,
        max_images=args.max_images,
        format=args.format,
        columns=dict(args.column),
    )
    if not is_main_process():
        return 0
    rows = {"contrastive": result["contrastive"]}
    if "reranked" in result:
        rows[f"re-ranked top-{args.k} (ITM, top-down)"] = result["reranked"]
    print(format_recall_table(rows))
    if "scene" in result:  # a Shapes world: are the hits right?
        print(format_scene_report(result["scene"]))
    print(
        f"{result['images']} images, {result['captions']} captions of {args.data} [{args.split}] "
        f"in {result['seconds']:.1f} s; {len(result['skipped'])} unreadable images left out"
    )
    for path, reason in result["skipped"][:10]:
        print(f"  skipped {path}: {reason}")
    _write_json(args.out, result)
    return 0


def _cmd_train_classify(args: argparse.Namespace) -> int:
    from .training.classify import train_classifier
    from .training.config import ClassifyConfig

    if args.backbone:
        args.overrides = [f"model.backbone={args.backbone}", *args.overrides]
    summary = train_classifier(_run_config(args, ClassifyConfig), notify=print)
    return _report_training(summary, lambda val: f"validation top-1 {val['top1']:.2f} %, top-5 {val['top5']:.2f} %")


def _cmd_eval_classify(args: argparse.Namespace) -> int:
    from .training.classify import evaluate_classifier

    result = evaluate_classifier(
        args.model, args.data, args.split, batch_size=args.batch_size, num_workers=args.num_workers
    )
    unreadable = result.pop("unreadable")
    if unreadable:
        print(f"{len(unreadable)} images skipped (unreadable): they count as wrong")
        for path, reason in unreadable[:10]:
            print(f"  {path}: {reason}")
    print(
        f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  "
        f"({result['images']} images of {args.data}/{args.split}, {result['skipped']} unreadable)"
    )
    _write_json(args.out, result)
    return 0


def _cmd_predict_vqa(args: argparse.Namespace) -> int:
    from .evaluation.vqa import predict_vqa_submission
    from .training.vqa import load_split

    config = _run_config(args)
    examples = load_split(config, args.split, require_annotations=False)
    submission, unreadable, fallback = predict_vqa_submission(
        args.model, examples, args.batch_size, config.data.num_workers
    )
    if unreadable:
        print(f"{unreadable} questions had unreadable images: answered {fallback!r}")
    _write_json(args.out, submission)
    return 0


def _cmd_predict_vqa_file(args: argparse.Namespace) -> int:
    import torch

    from .pipelines import answer_file, pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vqa = pipeline("vqa", model=args.model, device=device, batch_size=args.batch_size)
    summary = answer_file(vqa, args.input, args.out)
    print(
        f"wrote {args.out}: {summary['answered']} questions of {args.input} answered, "
        f"{len(summary['skipped'])} left out (unreadable images)"
    )
    for path, reason in summary["skipped"][:10]:
        print(f"  skipped {path}: {reason}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_dataset

    kind = None if args.kind == "auto" else args.kind
    try:
        report = check_dataset(
            args.path, kind, args.splits, args.answers, args.images, dict(args.column) or None, progress=True
        )
    except ValueError as exc:  # an unknown split name
        print(f"absvl data check: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    from .data.shapes import generate_shapes

    world = generate_shapes(args.out, num_images=args.images, seed=args.seed)
    splits = ", ".join(
        f"{split}: {n} images / {world.num_questions[split]} questions" for split, n in world.splits.items()
    )
    print(f"wrote the Shapes world to {world.root} ({splits}); text encoder in {world.text_encoder_dir}")
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (its data section is used)")
    p.add_argument("--data", help="dataset root (sets data.root)")
    p.add_argument(
        "--images",
        dest="data_images",
        metavar="DIR",
        help="image folder holding train2014/ val2014/ test2015/ when not under the dataset root (sets data.images)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.format=hf")


def _add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN",
        help="continue the latest checkpoint of train.output_dir, or of RUN (a run folder or a "
        "checkpoint; its config.yaml is used when --config is not given)",
    )


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    """``absvl train vqa|prior|retrieval|classify``."""
    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", metavar="TASK", required=True)
    p = train.add_parser("vqa", help="finetune on VQAv2 (or the Shapes world)")
    p.add_argument("--config", help="run config YAML (see configs/); optional with --resume RUN")
    _add_resume(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=2e-5")
    p.set_defaults(func=_cmd_train_vqa, needs_config=True)
    p = train.add_parser("prior", help="align the prior ξ (the prior loss alone, vision frozen) before `train vqa`")
    p.add_argument("--config", help="a VQA run config YAML (see configs/); optional with --resume RUN")
    _add_resume(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=400")
    p.set_defaults(func=_cmd_train_prior, needs_config=True)
    p = train.add_parser("retrieval", help="train image-text retrieval (contrastive + ITM with hard negatives)")
    p.add_argument("--config", help="run config YAML (see configs/); optional with --resume RUN")
    _add_resume(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.rerank_k=256")
    p.set_defaults(func=_cmd_train_retrieval, needs_config=True)
    p = train.add_parser("classify", help="train or finetune a backbone as an image (or patch) classifier")
    p.add_argument(
        "--data",
        help="dataset root (sets data.root): an ImageFolder DATA/train/<class>/*.jpg, "
        "DATA/val/<class>/*.jpg, or patch labels with data.format=patches",
    )
    p.add_argument("--backbone", help="registered backbone (sets model.backbone; see `absvl backbones`)")
    p.add_argument("--config", help="run config YAML (model/data/train sections; optional)")
    _add_resume(p)
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.mixup=0 train.epochs=30"
    )
    p.set_defaults(func=_cmd_train_classify)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """``absvl eval vqa|classify|retrieval``."""
    evaluate = sub.add_parser("eval", help="evaluate").add_subparsers(dest="task", metavar="TASK", required=True)
    p = evaluate.add_parser("vqa", help="official VQA accuracy of a model or of a results file")
    p.add_argument("--model", help="a save_pretrained folder")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--predictions", help="results file [{question_id, answer}] to score instead of a model")
    p.add_argument("--questions", help="official questions JSON (with --predictions)")
    p.add_argument("--annotations", help="official annotations JSON (with --predictions)")
    p.add_argument(
        "--metric-revision",
        choices=("07aecec", "master"),
        help="revision of the official vqaEval.py to reproduce (with --predictions; "
        "default: the specification's, 07aecec)",
    )
    p.add_argument("--out", help="write the accuracies as JSON here")
    _add_data_args(p)
    p.set_defaults(func=_cmd_eval_vqa)
    p = evaluate.add_parser("classify", help="top-1 / top-5 accuracy of a classifier on an ImageFolder split")
    p.add_argument("--model", required=True, help="folder exported by `absvl train classify` (its final/)")
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--split", default="val", help="sub-folder to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes (default 2)")
    p.add_argument("--out", help="write the accuracies as JSON here")
    p.set_defaults(func=_cmd_eval_classify, overrides=[])
    p = evaluate.add_parser(
        "retrieval",
        help="IR@1/5/10, TR@1/5/10 on a Karpathy caption file or a Hugging Face caption "
        "dataset (top-k re-ranked by ITM)",
    )
    p.add_argument("--model", required=True, help="a save_pretrained folder or Hub id")
    p.add_argument(
        "--data",
        required=True,
        help="Karpathy caption file (dataset_flickr30k.json, dataset_coco.json, ...), "
        "or a Hugging Face dataset: Hub id or local folder",
    )
    p.add_argument(
        "--format", choices=("karpathy", "hf"), help="format of --data (default: karpathy for a .json file, else hf)"
    )
    _add_column_argument(p, "image, captions, split, image_id")
    p.add_argument(
        "--images",
        help="image root (default: the caption file's folder; hf: where relative image paths are looked up first)",
    )
    p.add_argument("--split", default="test", help="split (default test)")
    p.add_argument(
        "--k", type=int, default=128, help="contrastive candidates re-ranked per query (default 128; COCO: 256)"
    )
    p.add_argument("--no-rerank", action="store_true", help="contrastive ranking only")
    p.add_argument("--max-images", type=int, help="evaluate on the first N images of the split")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes (default 2)")
    p.add_argument("--out", help="write the recalls as JSON here")
    p.set_defaults(func=_cmd_eval_retrieval, overrides=[])


def _add_predict_commands(sub: argparse._SubParsersAction) -> None:
    """``absvl predict vqa|vqa-file``."""
    predict = sub.add_parser("predict", help="write predictions").add_subparsers(
        dest="task", metavar="TASK", required=True
    )
    p = predict.add_parser("vqa", help="answers for a split in submission format")
    p.add_argument("--model", required=True, help="a save_pretrained folder")
    p.add_argument("--split", default="test-dev", help="split (default test-dev)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="submission file to write")
    _add_data_args(p)
    p.set_defaults(func=_cmd_predict_vqa)
    p = predict.add_parser("vqa-file", help="answer a JSONL/CSV file of (image, question) pairs")
    p.add_argument("--model", required=True, help="a save_pretrained folder or Hub id")
    p.add_argument(
        "--input",
        required=True,
        help="JSONL or CSV with 'image' and 'question' (image paths relative to "
        "the file's folder; other fields are kept)",
    )
    p.add_argument("--out", required=True, help="answers to write: JSONL, or CSV for a .csv name")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.set_defaults(func=_cmd_predict_vqa_file)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``absvl data check|shapes``."""
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="task", metavar="TASK", required=True)
    p = data.add_parser(
        "check",
        help="validate a VQAv2-format or caption dataset, a folder or a Hugging Face dataset (non-zero exit on errors)",
        description="Read a dataset as training reads it, open every image, and report counts per split, "
        "missing/unreadable images and malformed entries. PATH: a VQAv2 root; a Karpathy caption file "
        "(.json); or a Hugging Face dataset (Hub id, repository folder, parquet/arrow files, save_to_disk "
        "folder). --kind auto: a .json file is captions, a folder with VQAv2 questions files VQA, a Hugging "
        "Face dataset captions when it has a caption column (captions, caption, sentences, text, raw) and no "
        "question column, else VQA.",
    )
    p.add_argument("path", help="VQAv2 root, Karpathy caption file, or Hugging Face dataset (Hub id or local)")
    p.add_argument(
        "--kind", choices=("auto", "vqa", "captions"), default="auto", help="what the dataset is (default: auto)"
    )
    p.add_argument("--splits", nargs="*", help="splits to check (default: all present)")
    p.add_argument("--answers", help="answers.json of a model: report answers outside it (VQA)")
    p.add_argument(
        "--images",
        metavar="DIR",
        help="image folder holding train2014/ val2014/ test2015/ (captions: filepath/filename; Hugging Face: "
        "relative image paths) when not under the dataset root (as data.images)",
    )
    _add_column_argument(
        p, "VQA: question_id, image_id, question, answers, image, ...; captions: image, captions, split, image_id"
    )
    p.set_defaults(func=_cmd_data_check)
    p = data.add_parser("shapes", help="generate the Shapes world (VQAv2 + Karpathy formats, tiny text encoder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_data_shapes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="absvl", description="Top-down vision-language models (AbSViT, VARS, TDAM).")
    parser.add_argument("--version", action="version", version=f"absvl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("backbones", help="list registered vision backbones with parameters and MACs")
    p.add_argument("--family", help="only this family (vit, absvit, vars, tdam, resnet)")
    p.add_argument("--img-size", type=int, default=224, help="input size for the MACs estimate (default 224)")
    p.add_argument("--no-macs", action="store_true", help="skip the MACs estimate")
    p.set_defaults(func=_cmd_backbones)

    _add_train_commands(sub)
    _add_eval_commands(sub)
    _add_predict_commands(sub)
    _add_data_commands(sub)
    add_model_folder_commands(sub)  # convert, export, push, attend
    add_retrieval_commands(sub)  # index build|add, search
    add_serve_commands(sub)  # serve

    p = sub.add_parser(
        "demo",
        help="offline CPU demo: Shapes world, VQA and retrieval training, evaluation, attention maps, index and search",
    )
    p.add_argument("--config", default="configs/shapes_absvit_tiny.yaml", help="run config (default: the demo's)")
    p.add_argument("--out", default="outputs/demo", help="folder for the demo's report and PNG (default outputs/demo)")
    p.add_argument("--skip-retrieval", action="store_true", help="VQA only (no retrieval finetuning, index, search)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=2")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "data", None):
        args.overrides = [f"data.root={args.data}", *args.overrides]
    if getattr(args, "data_images", None):
        args.overrides = [f"data.images={args.data_images}", *args.overrides]
    try:
        return args.func(args)
    # bad input: one clear line (ABSVL_DEBUG=1: traceback); a TypeError is a bug unless it is an InputTypeError
    # (a ValueError too), so it keeps its traceback
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        if os.environ.get("ABSVL_DEBUG"):
            raise
        print(f"absvl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
