"""The ``freesegdiff`` command: parses each subcommand and assembles what it runs; the work is in the modules it calls."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import uvicorn
from pydantic import ValidationError
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from backend.evaluation.replay import ORDERS
from backend.images import ImageError, read_image_file
from backend.exports.brush_results import brush_results, prediction
from backend.models.assembly import ModelUnavailableError
from backend.options import FIDELITIES, OptionError, SegmentOptions, option_changes
from backend.exports.overlay import label_index_image, render_overlay
from backend.models.process import process_segmenter
from backend.models.identity import model_version
from backend.pipeline.vocabulary import Label, labels_from_names
from backend.settings import EncoderKind, EngineChoice, Settings, get_settings, settings_problems

if TYPE_CHECKING:
    from backend.storage.memory_store import ProjectMemories

log = logging.getLogger("freesegdiff")


def _segment_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("segment", help="segment image files into Label Studio predictions")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,person"')
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    _add_segment_options(parser)
    _add_result_names(parser)


def _add_segment_options(parser: argparse.ArgumentParser, strict_flag: bool = True) -> None:
    """The per-run pipeline options, read back by ``_options``."""
    parser.add_argument("--k", type=int, help="number of K-means clusters (FREESEG_K)")
    parser.add_argument("--refine", choices=["crf", "pamr", "none"], help="mask refinement (FREESEG_REFINE)")
    parser.add_argument("--no-caption", action="store_true", help="every label is a candidate (the paper's ablation)")
    if strict_flag:
        parser.add_argument("--strict", action="store_true",
                            help="no fallback when the caption yields no label (the paper's behaviour)")


def _add_result_names(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-name", default="label", help="BrushLabels name written in the results")
    parser.add_argument("--to-name", default="image", help="Image name written in the results")


def _labels(args: argparse.Namespace) -> list[Label]:
    """The labels of ``--labels``; empty (and logged) when it names none or repeats one."""
    labels = labels_from_names(args.labels.split(","))
    names = [label.name.lower() for label in labels]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if not labels:
        log.error("--labels names no label")
    elif repeated:
        log.error("--labels repeats %s: label names must be unique (the label map numbers them)", ", ".join(repeated))
        return []
    return labels


def _options(args: argparse.Namespace, settings: Settings) -> SegmentOptions:
    """The settings' options changed by the flags given, checked like a label config's (a bad --k exits 2)."""
    flags = {"k": args.k, "refine": args.refine, "use_caption": False if args.no_caption else None,
             "caption_fallback": False if args.strict else None}
    try:
        changes = option_changes({name: value for name, value in flags.items() if value is not None},
                                 where=lambda name: f"--{name.replace('_', '-')}")
    except OptionError as error:
        print(f"freesegdiff: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return dataclasses.replace(settings.segment_options, **changes)


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """Output names from the image names, made unique when two images share a stem."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return stems


def run_segment(args: argparse.Namespace) -> int:
    settings = get_settings()
    labels = _labels(args)
    if not labels:
        return 2
    options = _options(args, settings)
    segmenter = process_segmenter(settings)
    version = model_version(settings)
    warning = None if settings.models == "pretrained" else f"{settings.models} profile: random weights, not a real segmentation"
    limits = settings.image_limits
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    pairs = list(zip(args.images, _output_stems(args.images)))
    for path, stem in tqdm(pairs, desc="segment", unit="image", disable=len(pairs) < 2, file=sys.stderr):
        try:
            image = read_image_file(path, limits)
        except ImageError as error:
            tqdm.write(f"freesegdiff: {error}", file=sys.stderr)
            failed += 1
            continue
        segmentation = segmenter.segment_image(image, labels, options)
        results = brush_results(segmentation, args.from_name, args.to_name)
        record = prediction(results, segmentation.score, version)
        (args.out / f"{stem}.json").write_text(json.dumps(record))
        label_index_image(segmentation.label_map).save(args.out / f"{stem}.png")
        render_overlay(image, segmentation, warning).save(args.out / f"{stem}_overlay.png")
    if failed:
        log.error("%d of %d images could not be read", failed, len(pairs))
    return 1 if failed else 0


def _serve_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="run the Label Studio ML backend server")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9090, help="port (default 9090)")


def run_serve(args: argparse.Namespace) -> int:
    settings = get_settings()
    # With WORKERS > 1 uvicorn kills a child that misses a 5 s ping; importing torch and loading the
    # models can hold the interpreter that long on a busy machine, so the children get a minute.
    # On SIGTERM, a request still running after FREESEG_SHUTDOWN_GRACE_SECONDS is cancelled, its queued work with it.
    uvicorn.run("backend.server.app:create_app", factory=True, host=args.host, port=args.port,
                workers=settings.workers, log_level=settings.log_level.lower(), timeout_worker_healthcheck=60,
                timeout_graceful_shutdown=settings.shutdown_grace_seconds)
    return 0


def _download_parser(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("download", help="fetch exactly the model files the settings load (HF_ENDPOINT, HF_TOKEN, HF_HOME)")


def run_download(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from backend.models.assembly import download_models

    settings = get_settings()
    if settings.models != "pretrained":
        print(f"FREESEG_MODELS={settings.models} downloads nothing")
        return 0
    if constants.is_offline_mode():
        log.error("HF_HUB_OFFLINE is set: unset it to download")
        return 2
    try:
        download_models(settings)
    except (ValueError, HfHubHTTPError) as error:  # no such repo, no access, no loadable weights in it
        log.error("download failed: %s", error)
        return 2
    return 0


def _bench_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="measure throughput, latency and re-prompt cost against a naive baseline")
    parser.add_argument("--profile", choices=["tiny", "random-full", "pretrained"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--images", type=int, default=8, help="number of images (synthetic unless --image-dir)")
    parser.add_argument("--image-dir", type=Path, help="benchmark on the images of this folder instead")
    parser.add_argument("--batch", type=int, default=4, help="images per encode batch")
    parser.add_argument("--json", type=Path, dest="json_path", help="write the figures to this JSON file")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="the models' dtype (FREESEG_DTYPE)")
    parser.add_argument("--image-size", type=_image_sizes, default=[(500, 375)], metavar="WxH[,WxH...]",
                        help="size of the synthetic images (default 500x375); several sizes: only time one "
                             "prediction at a time (decoding to brush results) at each, sizes taking turns")
    parser.add_argument("--no-naive", dest="naive", action="store_false",
                        help="skip the naive mode (its full-size CRF takes minutes on big photos)")
    parser.add_argument("--compare-dtype", choices=["float32", "bfloat16", "float16"],
                        help="only time the features stage in --dtype and in this one, side by side, and compare "
                             "their cluster maps")
    parser.add_argument("--engine", choices=get_args(EngineChoice),
                        help="the feature network's engine (default: FREESEG_ENGINE)")
    parser.add_argument("--compare-engines", type=_names_of(EngineChoice, "engines"), default=(),
                        metavar="ENGINE[,ENGINE...]",
                        help="only time the features stage on each of these engines in --dtype, side by side with "
                             "float32 torch eager, and compare their cluster maps with its")
    parser.add_argument("--encoders", type=_names_of(EncoderKind, "encoders"), default=(), metavar="vae,taesd",
                        help="also time predictions one image at a time with each of these encoders "
                             "(FREESEG_ENCODER), side by side: a block per encoder in the figures")
    parser.add_argument("--caption-agreement", type=Path, metavar="FOLDER",
                        help="also caption this folder's photos (VOC's JPEGImages/ inside it) with torch eager and "
                             "with FREESEG_CAPTION_ENGINE's engine (openvino: set it; auto is torch), and report "
                             "how many get the same tokens")
    parser.add_argument("--no-floors", dest="floors", action="store_false",
                        help="skip each stage's floor (its GFLOP counted over one more prediction on torch eager, "
                             "over the measured float32 GEMM peak)")


def _names_of(choices: object, what: str) -> Callable[[str], tuple[str, ...]]:
    """An argument type: names separated by commas, each one of the Literal ``choices``."""
    allowed = get_args(choices)

    def names(text: str) -> tuple[str, ...]:
        given = tuple(text.split(","))
        unknown = [name for name in given if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}: choose from {', '.join(allowed)}")
        return given

    return names


def _image_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        width, _, height = item.lower().partition("x")
        try:
            size = int(width), int(height)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not WIDTHxHEIGHT, e.g. 6000x4000") from None
        if min(size) < 16:
            raise argparse.ArgumentTypeError(f"{item!r}: each side must be at least 16 pixels")
        sizes.append(size)
    return sizes


def run_bench_command(args: argparse.Namespace) -> int:
    from backend.benchmark.bench import BenchConfig, run_bench

    config = BenchConfig(profile=args.profile, device=args.device, images=args.images, batch=args.batch,
                         image_dir=args.image_dir, json_path=args.json_path, dtype=args.dtype,
                         image_size=args.image_size[0], naive=args.naive, compare_dtype=args.compare_dtype,
                         engine=args.engine, compare_engines=args.compare_engines, encoders=args.encoders,
                         caption_agreement=args.caption_agreement,
                         floors=args.floors,
                         compare_sizes=tuple(args.image_size) if len(args.image_size) > 1 else ())
    run_bench(config, get_settings())
    return 0


def _eval_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="mIoU on a standard dataset (VOC, COCO-Object, COCO-27) in a local folder")
    parser.add_argument("--dataset", choices=["voc", "coco-object", "coco27", "folder"], required=True,
                        help="folder: a labelled folder (classes.txt, images/, labels/; "
                             "see docs/learning.md, \"The learning replay\")")
    parser.add_argument("--root", type=Path, required=True,
                        help="the dataset's folder (see docs/quality.md, \"Evaluation\")")
    parser.add_argument("--learn", action="store_true",
                        help="replay: predict, correct with the ground truth, learn; mIoU with and without learning")
    parser.add_argument("--order", choices=ORDERS, default="dataset",
                        help="with --learn: teach in the dataset's order, or lowest prediction confidence first")
    parser.add_argument("--holdout", type=int, default=0, metavar="N",
                        help="with --learn: score the last N images, never taught (default: the images not yet taught)")
    parser.add_argument("--limit", type=int, help="score only the first N images")
    parser.add_argument("--predictions", type=Path, help="score these label-index PNGs instead of running the models")
    _add_segment_options(parser, strict_flag=False)
    parser.add_argument("--fidelity", choices=FIDELITIES,
                        help="release: the authors' released code's rules, to check the paper's figures "
                             "(FREESEG_FIDELITY)")
    parser.add_argument("--json", type=Path, dest="json_path", required=True, help="write the figures here")
    parser.set_defaults(strict=True)  # the paper's protocol: no fallback when the caption names no class


def run_eval(args: argparse.Namespace) -> int:
    from backend.evaluation.run import evaluate_predictions, evaluate_with_model, write_json

    if args.learn:
        return run_replay(args)
    if args.predictions:
        result = evaluate_predictions(args.dataset, args.root, args.predictions, args.limit)
    else:
        settings = get_settings()
        if args.fidelity:
            try:
                settings = settings.with_fidelity(args.fidelity)
            except ValueError as error:  # --fidelity release with FREESEG_CAPTIONER=blip2
                log.error("--fidelity %s: %s", args.fidelity, error)
                return 2
        segmenter = process_segmenter(settings)
        options = _options(args, settings)
        result = evaluate_with_model(
            args.dataset, args.root, args.limit,
            lambda image, names: segmenter.segment_image(image, labels_from_names(names), options).label_map,
        )
    write_json(result, args.json_path)
    print(f"{result['dataset']}: mIoU {result['miou']:.2f} (dataset-level, as mmsegmentation)  "
          f"pixel accuracy {result['pixel_accuracy']:.2f}  mean of per-image mIoU {result['miou_per_image_mean']:.2f}  "
          f"authors' per-image mean {result['miou_per_image_release']:.2f} (as their released code)  "
          f"({result['num_images']} images)")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from backend.evaluation.replay import format_replay, replay_dataset
    from backend.evaluation.run import write_json
    from backend.storage.memory_store import memory_bounds

    settings = get_settings()
    try:
        result = replay_dataset(process_segmenter(settings), args.dataset, args.root, args.limit,
                                _options(args, settings), memory_bounds(settings), args.order, args.holdout)
    except ValueError as error:  # a held-out set that leaves nothing to teach
        log.error("--holdout %d: %s", args.holdout, error)
        return 2
    write_json(result.to_dict(), args.json_path)
    if settings.models != "pretrained":
        print(f"{settings.models} profile: random weights; the figures measure the memory's mechanics only")
    print(format_replay(result))
    return 0


def _scenes_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("synthetic-scenes", help="write synthetic labelled scenes (exact ground truth)")
    parser.add_argument("--out", required=True, type=Path, help="folder to write classes.txt, images/, labels/ to")
    parser.add_argument("--count", type=int, default=16, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0)


def run_scenes(args: argparse.Namespace) -> int:
    from backend.evaluation.synthetic import write_scenes

    print(f"{args.count} scenes: {write_scenes(args.out, args.count, args.seed)}")
    return 0


def _report_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("report", help="how annotators corrected the pre-annotations of a project, per label")
    parser.add_argument("--project", required=True, help="Label Studio project id")
    parser.add_argument("--chart", type=Path, help="PNG of IoU per label over time (default feedback-<project>.png)")


def run_report(args: argparse.Namespace) -> int:
    from backend.labelstudio.corrections import summarize
    from backend.storage.backing import feedback_store
    from backend.evaluation.report import format_over_time, format_table, render_chart

    settings = get_settings()
    records = feedback_store(settings).records(args.project)
    if not records:
        log.error("no feedback recorded for project %s yet (annotations of tasks with our predictions)", args.project)
        return 1
    print(format_table(summarize(records)))
    print("\nper label: taught to the memory (regions), and mean IoU over time (annotations in time order):")
    print(format_over_time(records, taught=_taught_regions(settings, args.project)))
    chart = render_chart(records, args.chart or Path(f"feedback-{args.project}.png"))
    print(f"{len(records)} annotations; chart {chart}")
    return 0


def _taught_regions(settings: Settings, project: str) -> dict[str, int] | None:
    """Each label the project's memory (of these models) was taught, with its regions; None when unreadable."""
    from backend.storage.backing import project_memories
    from backend.models.identity import settings_fingerprint
    from backend.pipeline.memory import UNLABELED

    try:
        memory = project_memories(settings).load(project, settings_fingerprint(settings))
    except Exception as error:  # StoreError, an unreadable memory: the report goes on without it
        log.warning("project %s: its memory could not be read: %s", project, error)
        return None
    labels = memory.labels if memory is not None else []
    return {label: memory.regions_taught(label) for label in labels if label != UNLABELED}


def _annotate_folder_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("annotate-folder", help="bootstrap a dataset: predictions for every image of a folder")
    parser.add_argument("dir", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,person"')
    parser.add_argument("--out", required=True, type=Path, help="output folder: tasks.json, coco.json, masks/")
    references = parser.add_mutually_exclusive_group()
    references.add_argument("--image-root-url", help="tasks reference images as this URL prefix (end it with /)")
    references.add_argument("--local-files-root", type=Path,
                            help="tasks reference images as Label Studio local files under this document root "
                                 "(default: DIR)")
    _add_segment_options(parser)
    _add_result_names(parser)
    parser.add_argument("--queue", action="store_true",
                        help="segment on Redis Queue workers (freesegdiff worker, REDIS_URL; DIR, OUT shared by all)")


def run_annotate_folder(args: argparse.Namespace) -> int:
    from backend.storage.cached_encoder import one_pass_cache
    from backend.jobs.folder import (
        FolderRun,
        annotate_folder,
        annotate_folder_queued,
        local_files_reference,
        url_prefix_reference,
    )

    settings = get_settings()
    labels = _labels(args)
    if not labels:
        return 2
    reference = (url_prefix_reference(args.image_root_url, args.dir) if args.image_root_url
                 else local_files_reference(args.local_files_root or args.dir))
    run = FolderRun(Path(args.dir), Path(args.out), tuple(labels), _options(args, settings), args.from_name,
                    args.to_name)
    try:
        if args.queue:
            summary = annotate_folder_queued(run, reference, settings)
        else:
            summary = annotate_folder(run, process_segmenter(settings), model_version(settings), reference,
                                      limits=settings.image_limits, cache=one_pass_cache(settings))
    except ValueError as error:  # an image outside --local-files-root, or --queue without REDIS_URL
        log.error("%s", error)
        return 2
    for path, reason in summary.failed:
        log.error("%s: %s", path, reason)
    rate = summary.done / summary.seconds if summary.seconds > 0 else 0.0
    print(f"{summary.done} images annotated, {len(summary.failed)} failed, in {summary.seconds:.1f} s "
          f"({rate:.2f} images/s): {args.out}")
    return 1 if summary.failed else 0


def _annotate_project_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("annotate-project",
                                 help="predict every task of a Label Studio project (resumable; --queue for workers)")
    parser.add_argument("--project", required=True, type=int, help="Label Studio project id")
    parser.add_argument("--url", help="Label Studio's address (default LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", help="its access token (default LABEL_STUDIO_API_KEY)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this model version's predictions instead of skipping tasks that have one")
    parser.add_argument("--queue", action="store_true",
                        help="put chunks of task ids on Redis Queue for freesegdiff worker (REDIS_URL)")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --queue: return once the chunks are queued (follow with freesegdiff jobs)")


def run_annotate_project(args: argparse.Namespace) -> int:
    from backend.labelstudio.backoff import LABEL_STUDIO_ERRORS, describe
    from backend.jobs.progress import summary
    from backend.jobs.project import annotate_project, annotate_project_queued
    from backend.labelstudio.project_context import open_project
    from backend.labelstudio.projects import ProjectStore
    from backend.storage.backing import shared_store

    settings = _with_access_flags(args, get_settings())
    try:
        project, connection = open_project(settings, args.project, ProjectStore(shared_store(settings)))
        if args.queue:
            result = annotate_project_queued(project, settings, args.overwrite, wait=not args.no_wait)
        else:
            result = annotate_project(project, connection, settings, args.overwrite)
    except ValueError as error:  # no URL or key, an unusable label config or extra_params, no REDIS_URL
        log.error("project %s: %s", args.project, error)
        return 2
    except LABEL_STUDIO_ERRORS as error:
        log.error("project %s: Label Studio failed: %s", args.project, describe(error))
        return 2
    progress = result.progress
    if progress is None:
        print(f"run {result.run_id} queued; follow it with: freesegdiff jobs --run {result.run_id}")
        return 0
    print(summary(f"project {args.project}" + (f" (run {result.run_id})" if result.run_id else ""), progress))
    if result.version:
        print(f"  model version {result.version} (select it in the project's settings to label with these)")
    nothing_done = progress.failed > 0 and progress.done + progress.skipped == 0
    return 1 if nothing_done else 0


def _with_access_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """The settings with ``--url`` and ``--api-key``, where given, in place of LABEL_STUDIO_URL and its key."""
    return settings.model_copy(update={"label_studio_url": args.url or settings.label_studio_url,
                                       "label_studio_api_key": args.api_key or settings.label_studio_api_key})


def _learn_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("learn", help="rebuild a project's memory from all its annotations (as Start Training)")
    parser.add_argument("--project", required=True, type=int, help="Label Studio project id")
    parser.add_argument("--url", help="Label Studio's address (default LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", help="its access token (default LABEL_STUDIO_API_KEY)")
    instead = parser.add_mutually_exclusive_group()
    instead.add_argument("--forget", action="store_true", help="clear the project's memory instead (no models loaded)")
    instead.add_argument("--show", action="store_true",
                         help="show what the project's memory was taught instead: labels, regions, cells, bytes, "
                              "revision, annotations (no models loaded)")


def run_learn(args: argparse.Namespace) -> int:
    from backend.labelstudio.backoff import LABEL_STUDIO_ERRORS, Backoff, describe
    from backend.labelstudio.task_images import TaskImageLoader
    from backend.labelstudio.teacher import ProjectTeacher
    from backend.labelstudio.project_context import label_studio_access
    from backend.labelstudio.projects import ProjectStore
    from backend.storage.backing import project_memories
    from backend.storage.cached_encoder import one_pass_cache, segmenter_encoder
    from backend.models.identity import settings_fingerprint
    from backend.storage.shared_store import StoreError

    settings = _with_access_flags(args, get_settings())
    project = str(args.project)
    memories = project_memories(settings)
    try:
        if args.show:
            return _show_memory(memories, project, settings)
        if args.forget:
            memory = memories.clear(project, settings_fingerprint(settings))
            print(f"project {project}: memory cleared (revision {memory.revision})" if memory
                  else f"project {project}: no memory for these models")
            return 0
        segmenter = process_segmenter(settings)
        projects = ProjectStore(memories.store.store)
        encoder = segmenter_encoder(segmenter, one_pass_cache(settings))  # the server's entries, with REDIS_URL
        teacher = ProjectTeacher(memories, projects, TaskImageLoader.from_settings(settings),
                                 lambda image: encoder.encode(image.data, image.pixels), segmenter.fingerprint,
                                 Backoff.from_settings(settings), settings.max_labels)
        memory = teacher.rebuild(project, label_studio_access(settings, lambda: projects.read(project)))
    except ValueError as error:  # no URL or key, an unusable label config
        log.error("project %s: %s", project, error)
        return 2
    except LABEL_STUDIO_ERRORS as error:
        log.error("project %s: Label Studio failed: %s", project, describe(error))
        return 2
    except StoreError as error:
        log.error("project %s: %s", project, error)
        return 2
    print(f"project {project}: memory of {len(memory.annotations)} annotations, labels "
          f"{', '.join(label for label in memory.labels if label) or 'none'}, revision {memory.revision}, "
          f"{memory.nbytes} bytes")
    return 0


def _show_memory(memories: ProjectMemories, project: str, settings: Settings) -> int:
    from backend.storage.memory_summary import MemorySummary
    from backend.models.identity import settings_fingerprint

    memory = memories.load(project, settings_fingerprint(settings))
    if memory is None:
        print(f"project {project}: no memory for these models")
        return 1
    print(MemorySummary.of(project, memory, model_version(settings)).format())
    return 0


def _worker_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("worker", help="an RQ worker for queued runs: loads the models once, takes chunks")
    parser.add_argument("--burst", action="store_true", help="quit once no chunk is queued or running")


def run_worker_command(args: argparse.Namespace) -> int:
    from backend.jobs.queue_worker import run_worker

    try:
        run_worker(get_settings(), args.burst)
    except ValueError as error:  # no REDIS_URL
        log.error("%s", error)
        return 2
    return 0


def _jobs_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("jobs", help="progress of background and queued runs (tasks done, skipped, failed)")
    parser.add_argument("--run", help="one queued run's details (default: the latest runs, one line each)")
    parser.add_argument("--cancel", metavar="ID", help="stop a background run (GET /jobs lists their ids)")


def run_jobs(args: argparse.Namespace) -> int:
    from backend.jobs.background_runs import cancel
    from backend.jobs.status import describe_background_run, describe_background_runs, describe_recent_runs, describe_run
    from backend.storage.backing import runs_redis, runs_redis_if_set, shared_store
    from backend.storage.run_registry import RunRegistry

    settings = get_settings()
    connection = runs_redis_if_set(settings)
    registry = RunRegistry(shared_store(settings))
    if args.cancel:
        record = cancel(registry, args.cancel, connection)
        if record is None:
            log.error("no background run %s", args.cancel)
            return 1
        print(describe_background_run(record))
        return 0
    if connection is None and not args.run:
        print(describe_background_runs(registry, None))
        return 0
    try:
        connection = connection or runs_redis(settings)
        print(describe_run(connection, args.run) if args.run else
              describe_background_runs(registry, connection) + "\n" + describe_recent_runs(connection))
    except ValueError as error:  # no REDIS_URL
        log.error("%s", error)
        return 2
    except KeyError:
        log.error("no run %s in Redis (runs are kept for seven days)", args.run)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freesegdiff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _segment_parser(commands)
    _serve_parser(commands)
    _download_parser(commands)
    _bench_parser(commands)
    _eval_parser(commands)
    _report_parser(commands)
    _scenes_parser(commands)
    _annotate_folder_parser(commands)
    _annotate_project_parser(commands)
    _learn_parser(commands)
    _worker_parser(commands)
    _jobs_parser(commands)
    return parser


def configure_logging(level: str) -> None:
    """Our loggers at ``LOG_LEVEL``; the libraries' chatter (open_clip logs to the root) at warnings only."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("backend").setLevel(level.upper())
    log.setLevel(level.upper())
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as error:  # a user's environment: what to change, not a traceback
        print("\n".join(f"freesegdiff: {line}" for line in settings_problems(error)), file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return {"segment": run_segment, "serve": run_serve, "download": run_download, "bench": run_bench_command,
                "eval": run_eval, "report": run_report, "synthetic-scenes": run_scenes,
                "annotate-folder": run_annotate_folder, "annotate-project": run_annotate_project,
                "learn": run_learn, "worker": run_worker_command, "jobs": run_jobs}[args.command](args)
    except ModelUnavailableError as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
