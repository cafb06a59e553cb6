"""The ``cmpagl`` command line.

``cmpagl train --config X.yaml [--set a.b=v ...] [--resume DIR]``    train (METHOD §2-§4)
``cmpagl evaluate --checkpoint DIR [--split test] [--rerank smr]``   metrics + result file
``cmpagl retrieve --checkpoint DIR --text "..." | --image PATH``      ranked results
``cmpagl retrieve --checkpoint DIR --interactive``                     queries from stdin
``cmpagl data stats PATH``       counts, caption statistics, repeated captions, cross-split images
``cmpagl data check PATH``       validate annotations and every image file
``cmpagl data synthetic OUT``    write the embedded synthetic dataset
``cmpagl sweep SPEC.yaml``       every (variant, seed) of a sweep as an executed notebook

Errors in the user's input (a wrong path, a bad file, an unknown config key, a run folder another
process trains in) print one line ``cmpagl: error: ...`` and exit with status 2, never a
traceback. ``cmpagl train`` stopped by Ctrl-C or SIGTERM writes a checkpoint, prints one line
with the command that resumes it, and exits with status 130 or 143.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset folder (Karpathy dataset.json or precomp *_caps.txt)")
    p.add_argument("--format", choices=["auto", "karpathy", "precomp"], default="auto")
    p.add_argument("--image-dir", help="image folder, if not PATH/images")
    p.add_argument(
        "--empty-captions",
        choices=["error", "drop"],
        default="error",
        help="what to do with empty caption lines (RSITMD's train file has 20)",
    )


def _load(args: argparse.Namespace):
    from cmpagl.data import load_dataset

    return load_dataset(
        args.path, format=args.format, image_dir=args.image_dir, empty_captions=args.empty_captions
    )


def cmd_data_stats(args: argparse.Namespace) -> int:
    from cmpagl.data.stats import dataset_statistics, format_statistics
    from cmpagl.data.validation import check_images

    ds = _load(args)
    if args.images:
        check_images(ds, decode=False)
    st = dataset_statistics(ds, with_images=args.images)
    print(json.dumps(st.to_dict(), indent=2) if args.json else format_statistics(st))
    return 0


def _image_reading(args: argparse.Namespace):
    """The ``data.image_*`` rule ``data check`` reads images by, from its options."""
    from cmpagl.config import ConfigError, DataConfig
    from cmpagl.data.build import image_reading_from_config

    cfg = DataConfig(
        image_scaling=args.image_scaling,
        image_percentiles=tuple(args.image_percentiles),
        image_bits=args.image_bits,
        image_bands=None if args.image_bands is None else tuple(args.image_bands),
    )
    try:
        return image_reading_from_config(cfg)
    except ConfigError as e:  # name the option, not the config key
        option = "--" + (e.key or "").removeprefix("data.").replace("_", "-")
        raise _UsageError(str(e).replace(e.key or "", option, 1)) from e


def cmd_data_check(args: argparse.Namespace) -> int:
    import warnings

    from cmpagl.data.validation import check_images, describe_kinds

    reading = _image_reading(args)
    ds = _load(args)
    with warnings.catch_warnings():  # the notes on bands and ranges are in the kinds below
        warnings.simplefilter("ignore", UserWarning)
        kinds = check_images(ds, decode=not args.no_decode, reading=reading)
    print(
        f"ok: {ds!r}; all {ds.num_images} image files present"
        + ("" if args.no_decode else " and readable")
    )
    rows = describe_kinds(kinds)
    if len(rows) == 1:
        print(f"image kinds: {rows[0]}")
    elif rows:
        print("image kinds:\n" + "\n".join(f"  {row}" for row in rows))
    return 0


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    from cmpagl.data.synthetic import generate_synthetic_dataset

    out = generate_synthetic_dataset(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        image_size=args.image_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"synthetic dataset in {out}")
    return 0


def _prepare_synthetic(data) -> None:
    """The explicit data step of train/evaluate/retrieve: a config naming the synthetic dataset
    gets it generated (and announced in one line) before anything loads it; the loaders
    themselves never generate. Under torchrun only rank 0 writes: training's data loading keeps
    the other ranks at a barrier until rank 0 has read the finished folder."""
    from cmpagl.data.build import prepare_synthetic_dataset

    if int(os.environ.get("RANK", "0")) == 0:
        prepare_synthetic_dataset(data)


def _program() -> list[str]:
    """What starts cmpagl the way this process was started, for a command to copy and paste:
    ``cmpagl``, ``python -m cmpagl.cli``, a script's path; under torchrun, torchrun with as
    many processes. ``cmpagl`` when called in-process (``main([...])`` from a test)."""
    argv, orig = sys.argv, list(getattr(sys, "orig_argv", sys.argv))
    n = len(argv) - 1
    if n < 1 or argv[1] != "train" or orig[len(orig) - n :] != argv[1:]:
        return ["cmpagl"]
    head = orig[: len(orig) - n]  # [python, options..., -m, cmpagl.cli] or [python, ..., script]
    as_module = "-m" in head
    target = head[head.index("-m") :] if as_module else [argv[0]]  # what torchrun takes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = ["--standalone"] if local == world else [f"--nnodes={world // local}"]
        return ["torchrun", *nodes, f"--nproc_per_node={local}", *target]
    if as_module or Path(argv[0]).suffix == ".py":
        return head  # python [options] -m cmpagl.cli, python path/to/cli.py
    if Path(argv[0]).name == "cmpagl" and _same_file(shutil.which("cmpagl"), argv[0]):
        return ["cmpagl"]
    return [argv[0]]  # the console script by its path (a venv not on PATH)


def _same_file(a: str | None, b: str) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def _resume_command(args: argparse.Namespace, output_dir: str) -> str:
    """The command line that continues an interrupted ``cmpagl train``: the user's own, with
    ``--resume`` naming the run folder the checkpoint went to."""
    words = ["train"]
    if args.config is not None:
        words += ["--config", args.config]
    for item in args.set:
        words += ["--set", item]
    words += ["--resume", output_dir]
    command = shlex.join([*_program(), *words])
    world, local = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("LOCAL_WORLD_SIZE")
    if world > 1 and local is not None and int(local) != world:
        return f"(on every node, with your rendezvous options) {command}"
    return command


def cmd_train(args: argparse.Namespace) -> int:
    from cmpagl.config import load_config
    from cmpagl.train import TrainingInterrupted, train

    config = args.config
    if config is None:
        if args.resume is None:
            raise _UsageError("give --config FILE (or --resume DIR to continue a run)")
        config = str(Path(args.resume) / "config.yaml")
    cfg = load_config(config, overrides=args.set)
    _prepare_synthetic(cfg.data)
    try:
        result = train(cfg, resume=args.resume, config_path=config)
    except TrainingInterrupted as stop:
        if stop.rank == 0:
            resume = _resume_command(args, cfg.output_dir)
            print(f"cmpagl: {stop}; resume with: {resume}", file=sys.stderr, flush=True)
        return stop.exit_status
    if result.best_r_mean is not None:
        print(
            f"best val r_mean {result.best_r_mean:.2f} at epoch {result.best_epoch}; "
            f"checkpoint {result.best_checkpoint}"
        )
    print(
        f"{result.steps} steps in {result.wall_time_s:.0f} s "
        f"({result.samples_per_s:.1f} samples/s); log {result.log_path}"
    )
    return 0


def _load_for_eval(args: argparse.Namespace):
    import torch

    from cmpagl.checkpoint import load_checkpoint
    from cmpagl.config import apply_overrides, from_dict, to_dict

    model, cfg, _ = load_checkpoint(args.checkpoint, prefer="best")
    if args.set:  # e.g. --set data.root=/elsewhere for a moved dataset
        cfg = from_dict(type(cfg), apply_overrides(to_dict(cfg), args.set), "--set")
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    return model.to(device).eval(), cfg, device


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cmpagl.evaluate import DEFAULT_RERANKERS, RERANKERS, evaluate_model

    rerank = [r for item in args.rerank for r in item.split(",") if r]
    unknown = [r for r in rerank if r not in RERANKERS]
    if unknown:
        raise _UsageError(
            f"unknown re-ranker(s) {', '.join(unknown)}; known: {', '.join(RERANKERS)}"
        )
    model, cfg, device = _load_for_eval(args)
    _prepare_synthetic(cfg.data)
    if not rerank:  # an ITM head that was never trained (w_itm = 0) would only add noise
        rerank = [r for r in DEFAULT_RERANKERS if cfg.loss.w_itm > 0 or "itm" not in r]
    result = evaluate_model(
        model,
        cfg,
        split=args.split,
        rerankers=rerank,
        device=device,
        checkpoint=str(args.checkpoint),
        out_dir=args.out,
        save_scores=not args.no_scores,
    )
    keys = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
    # r_mean_index: the public evaluators' tie convention, to set beside published tables
    print(f"{'re-ranker':<18}" + "".join(f"{k:>9}" for k in keys) + f"{'mR index':>10}")
    for name, metrics in result["metrics"].items():
        print(
            f"{name:<18}"
            + "".join(f"{metrics[k]:>9.2f}" for k in keys)
            + f"{metrics['r_mean_index']:>10.2f}"
        )
    oracle = result.get("oracle") or {}
    if oracle:
        print(
            f"{'oracle bound':<18}"
            + "".join(f"{oracle.get('oracle_' + k, float('nan')):>9.2f}" for k in keys)
        )
    for name, choice in result.get("tuning", {}).items():
        print(f"{name:<18}{_describe_choice(choice)}")
    print(f"results: {result['files']['results']}")
    return 0


def _describe_choice(choice: dict) -> str:
    """One line: a re-ranker's settings, where they came from, and axes chosen at an edge."""
    if choice["source"] != "val grid search":
        return f"{choice['params']} ({choice['note']})"
    if choice["params"] is None:
        return f"no re-ranking (best of {choice['grid_size']} on val)"
    edges = [axis for axis, on in choice["on_edge"].items() if on]
    edge = f"; on the grid's edge: {', '.join(edges)}" if edges else ""
    return f"{choice['params']} (best of {choice['grid_size']} on val{edge})"


def cmd_retrieve(args: argparse.Namespace) -> int:
    from cmpagl.checkpoint import find_checkpoint
    from cmpagl.data.build import (
        dataset_from_config,
        image_reading_from_config,
        transforms_from_config,
    )
    from cmpagl.data.validation import check_images, load_image
    from cmpagl.retrieval import (
        cached_embeddings,
        search_by_image,
        search_by_text,
        split_fingerprint,
    )

    given = [args.text is not None, args.image is not None, args.interactive]
    if sum(given) != 1:
        raise _UsageError("give exactly one of --text, --image or --interactive")
    if args.interactive and args.gallery:
        raise _UsageError("--gallery draws one query's results; it does not go with --interactive")
    model, cfg, device = _load_for_eval(args)
    _prepare_synthetic(cfg.data)
    # Only the split's files must exist here: embedding it reads every image (and names a file
    # that cannot be read), and a repeated query, answered from the cache, reads none. Decoding
    # the whole dataset up front (data.check_images, as training does) would cost every call.
    ds = dataset_from_config(replace(cfg.data, check_images=False)).split(args.split)
    check_images(ds, decode=False)
    _, transform = transforms_from_config(cfg.data)
    # The split's embeddings are cached beside the checkpoint, keyed by the checkpoint, the
    # images, the captions and the reading settings: a repeated query does not embed again.
    folder = find_checkpoint(args.checkpoint, prefer="best")
    cache = folder.parent / f".embeddings_{folder.name}_{args.split}.pt"
    key = split_fingerprint(ds, folder, (cfg.data, cfg.model.gswin.img_size))
    emb, cached = cached_embeddings(
        model, ds, transform, cache, key, cfg.retrieval.batch_size, device
    )
    print(
        f"split embeddings {'read from' if cached else 'computed and cached in'} "
        f"{cache.name} ({ds.num_images} images, {ds.num_captions} captions)"
    )
    reading = image_reading_from_config(cfg.data)

    def answer(text: str | None, image_path: str | None) -> list:
        if text is not None:
            hits = search_by_text(model, emb, ds, text, args.top)
            print(f"images of the {args.split} split for: {text!r}")
        else:
            image = transform(load_image(image_path, reading)).to(device)
            hits = search_by_image(model, emb, image, args.top)
            print(f"captions of the {args.split} split for image {image_path}")
        for rank, hit in enumerate(hits, 1):
            print(f"{rank:>3}. {hit.score:+.4f}  {describe_hit(ds, hit, text is not None)}")
        return hits

    if args.interactive:
        return _retrieve_interactively(answer)
    hits = answer(args.text, args.image)
    if args.gallery:
        from cmpagl.viz import save_gallery

        path = save_gallery(args.text or "", hits, ds, args.gallery, query_image=args.image)
        print(f"gallery: {path}")
    return 0


def describe_hit(ds, hit, image: bool) -> str:
    """One result line after the score, enough to judge it without opening a file: an image's
    file name, its class where the dataset has classes, and its first caption; a caption's text
    and the image it belongs to (with its class)."""
    if image:
        kind = f" [{ds.labels[hit.index]}]" if ds.labels else ""
        return f"{hit.label}{kind}  {ds.captions[hit.index][0]!r}"
    owner = int(ds.txt2img[hit.index])
    kind = f"[{ds.labels[owner]}] " if ds.labels else ""
    return f"{hit.label!r}  ({kind}{ds.filenames[owner]})"


# What a line that names a missing file probably meant to be (an image query).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def _retrieve_interactively(answer) -> int:
    """Queries from standard input, one per line, each answered with the model and the split's
    embeddings already in memory: a line naming an existing file is an image query, any other
    line a text query; an empty line, ``quit``, end of input or Ctrl-C stops. A query that
    fails (an unreadable image, say) prints its one-line error and the loop goes on."""
    import time

    from cmpagl.data.dataset import DataError

    interactive = sys.stdin.isatty()
    if interactive:
        print("one query per line (text, or the path of an image); an empty line ends")
    while True:
        if interactive:
            print("query> ", end="", flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session quietly
            print()
            return 0
        query = line.strip()
        if not line or not query or query == "quit":
            return 0
        start = time.perf_counter()
        try:
            path = Path(query).expanduser()
            if path.is_file():
                answer(None, str(path))
            else:
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    print(f"note: there is no file {query}; searching for it as text")
                answer(query, None)
        except (DataError, OSError, ValueError) as err:
            print(f"error: {err}")
        print(f"({time.perf_counter() - start:.2f} s)", flush=True)


def cmd_sweep(args: argparse.Namespace) -> int:
    from cmpagl.experiments import run_from_args

    return run_from_args(args)


class _UsageError(ValueError):
    """A wrong combination of options (printed as one line, exit status 2)."""


def _add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )
    p.add_argument("--resume", help="run folder to continue from its last checkpoint")
    p.set_defaults(func=cmd_train)

    for name, helptext in (
        ("evaluate", "retrieval metrics of a checkpoint"),
        ("retrieve", "rank images for a text, or captions for an image"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--checkpoint",
            required=True,
            help="a run folder (its best/ checkpoint) or a checkpoint folder",
        )
        p.add_argument("--split", default="test", choices=["train", "val", "test"])
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override the saved config, e.g. --set data.root=/new/place",
        )
        if name == "evaluate":
            p.add_argument(
                "--rerank",
                action="append",
                default=[],
                help="re-rankers (repeatable or comma-separated): none, itm, smr, "
                "itm+smr, dual_softmax, inverted_softmax, galr; default all (ITM ones only "
                "for models trained with ITM); each tuned on the val split",
            )
            p.add_argument("--out", help="folder for results_<split>.json (default: checkpoint)")
            p.add_argument(
                "--no-scores", action="store_true", help="do not save the similarity matrices"
            )
            p.set_defaults(func=cmd_evaluate)
        else:
            p.add_argument("--text", help="a caption to search images with")
            p.add_argument("--image", help="an image file to search captions with")
            p.add_argument("--top", type=int, default=5)
            p.add_argument("--gallery", help="also write the results as a PNG here")
            p.add_argument(
                "--interactive",
                action="store_true",
                help="answer queries from standard input, one per line (text, or an image's "
                "path); the model and the split's embeddings load once",
            )
            p.set_defaults(func=cmd_retrieve)


def _add_image_reading_args(p: argparse.ArgumentParser) -> None:
    """Options mirroring ``data.image_*``: how 16-bit, float and multi-band images are read."""
    from cmpagl.config import DataConfig

    d = DataConfig()
    p.add_argument(
        "--image-scaling",
        choices=["percentile", "bits"],
        default=d.image_scaling,
        help="how images of more than 8 bits become 8-bit (data.image_scaling)",
    )
    p.add_argument(
        "--image-percentiles",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=list(d.image_percentiles),
        help="percentiles of the stretch (data.image_percentiles; default %(default)s)",
    )
    p.add_argument(
        "--image-bits",
        type=int,
        default=d.image_bits,
        help="bit depth for --image-scaling bits (data.image_bits; default %(default)s)",
    )
    p.add_argument(
        "--image-bands",
        type=int,
        nargs=3,
        metavar=("R", "G", "B"),
        help="band numbers (from 1) used as RGB for images of more than 3 bands "
        "(data.image_bands; default 1 2 3)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmpagl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parsers(sub)
    from cmpagl.experiments import add_arguments  # light: torch loads only when runs execute

    p = sub.add_parser("sweep", help="run a sweep: every (variant, seed) as an executed notebook")
    add_arguments(p)
    p.set_defaults(func=cmd_sweep)
    data = sub.add_parser("data", help="inspect, check and generate datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("stats", help="dataset statistics")
    _add_dataset_args(p)
    p.add_argument(
        "--images",
        action="store_true",
        help="also hash every image to find the same image in two splits",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.set_defaults(func=cmd_data_stats)

    p = dsub.add_parser("check", help="validate annotations and image files")
    _add_dataset_args(p)
    p.add_argument("--no-decode", action="store_true", help="only check that files exist")
    _add_image_reading_args(p)
    p.set_defaults(func=cmd_data_check)

    p = dsub.add_parser("synthetic", help="write the synthetic default dataset")
    p.add_argument("out", help="output folder")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=250)
    p.add_argument("--n-test", type=int, default=250)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_synthetic)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline by default: nothing fetched
    from cmpagl.checkpoint import CheckpointError
    from cmpagl.config import ConfigError
    from cmpagl.data.dataset import DataError
    from cmpagl.models.pretrained import PretrainedUnavailable

    try:
        return args.func(args)
    except (
        DataError,
        ConfigError,
        CheckpointError,
        PretrainedUnavailable,  # Swin or text weights named but not loadable: one line, the fix
        FileNotFoundError,
        _UsageError,
    ) as e:
        print(f"cmpagl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
