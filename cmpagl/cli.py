"""The ``cmpagl`` command line.

``cmpagl data stats PATH``       counts, caption statistics, repeated captions, cross-split images
``cmpagl data check PATH``       validate annotations and every image file
``cmpagl data synthetic OUT``    write the embedded synthetic dataset

Errors in the user's input (a wrong path, a bad file, an unknown config key) print one line
``cmpagl: error: ...`` and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dataset folder (Karpathy dataset.json or precomp *_caps.txt)")
    p.add_argument("--format", choices=["auto", "karpathy", "precomp"], default="auto")
    p.add_argument("--image-dir", help="image folder, if not PATH/images")
    p.add_argument("--empty-captions", choices=["error", "drop"], default="error",
                   help="what to do with empty caption lines (RSITMD's train file has 20)")


def _load(args: argparse.Namespace):
    from cmpagl.data import load_dataset

    return load_dataset(args.path, format=args.format, image_dir=args.image_dir,
                        empty_captions=args.empty_captions)


def cmd_data_stats(args: argparse.Namespace) -> int:
    from cmpagl.data.stats import dataset_statistics, format_statistics
    from cmpagl.data.validation import check_images

    ds = _load(args)
    if args.images:
        check_images(ds, decode=False)
    st = dataset_statistics(ds, with_images=args.images)
    print(json.dumps(st.to_dict(), indent=2) if args.json else format_statistics(st))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from cmpagl.data.validation import check_images

    ds = _load(args)
    check_images(ds, decode=not args.no_decode)
    print(f"ok: {ds!r}; all {ds.num_images} image files present"
          + ("" if args.no_decode else " and readable"))
    return 0


def cmd_data_synthetic(args: argparse.Namespace) -> int:
    from cmpagl.data.synthetic import generate_synthetic_dataset

    out = generate_synthetic_dataset(args.out, n_train=args.n_train, n_val=args.n_val,
                                     n_test=args.n_test, image_size=args.image_size,
                                     seed=args.seed, overwrite=args.overwrite)
    print(f"synthetic dataset in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmpagl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="inspect, check and generate datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("stats", help="dataset statistics")
    _add_dataset_args(p)
    p.add_argument("--images", action="store_true",
                   help="also hash every image to find the same image in two splits")
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.set_defaults(func=cmd_data_stats)

    p = dsub.add_parser("check", help="validate annotations and image files")
    _add_dataset_args(p)
    p.add_argument("--no-decode", action="store_true", help="only check that files exist")
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
    from cmpagl.config import ConfigError
    from cmpagl.data.dataset import DataError

    try:
        return args.func(args)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"cmpagl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
