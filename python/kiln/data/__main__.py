"""Command line: ``python -m kiln.data from-idx --idx-dir DIR --out OUT``."""

from __future__ import annotations

import argparse
import sys
import time

from kiln.data.idx import CLASS_FOLDER_NAMES, idx_to_png_tree


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kiln.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from_idx = commands.add_parser(
        "from-idx",
        help="convert MNIST-style IDX files into OUT/{train,test}/<class>/<index>.png",
        description="Convert train-*/t10k-* IDX files (plain or .gz) into OUT/{train,test}/<class>/<index>.png.",
    )
    from_idx.add_argument("--idx-dir", required=True, help="directory holding the four IDX files")
    from_idx.add_argument("--out", required=True, help="output directory (built atomically)")
    from_idx.add_argument(
        "--per-class-limit",
        type=_positive_int,
        metavar="N",
        help="keep only the first N images of each class in each split",
    )
    from_idx.add_argument(
        "--test-per-class-limit",
        type=_positive_int,
        metavar="N",
        help="per-class limit for the test split (default: --per-class-limit)",
    )
    from_idx.add_argument(
        "--classes",
        choices=list(CLASS_FOLDER_NAMES),
        default="fashion-mnist",
        help="class folder naming (default: fashion-mnist)",
    )
    from_idx.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists and is not empty",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        counts = idx_to_png_tree(
            args.idx_dir,
            args.out,
            classes=args.classes,
            per_class_limit=args.per_class_limit,
            test_per_class_limit=args.test_per_class_limit,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    per_split = ", ".join(f"{split} {count}" for split, count in counts.items())
    elapsed = time.perf_counter() - started
    print(f"wrote {sum(counts.values())} PNGs to {args.out} ({per_split}) in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
