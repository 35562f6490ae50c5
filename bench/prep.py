"""Benchmark: kiln's data preparation vs the plain-Python PIL loop a user would otherwise write.

    python bench/prep.py                      # full Fashion-MNIST (70k PNGs), Debian's
                                              # dataset-fashion-mnist
    python bench/prep.py --raw DIR --repeat 5 # any <raw>/<split>/<class>/<image> tree

Each implementation runs in its own process (so peak RSS is its own), alternating, after one
warm-up pass that fills the page cache. Both must produce identical arrays; the script checks that
and prints images/s of both, their ratio, and kiln's peak RSS against DESIGN.md's budget
(2 x output + 300 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEBIAN_IDX = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]


def baseline_prepare(raw: Path, out: Path) -> int:
    """The template-style preparation: PIL decode in a Python loop, numpy arrays, torch.save."""
    import numpy as np
    import torch
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    splits = sorted(d.name for d in raw.iterdir() if d.is_dir())
    classes = sorted({c.name for s in splits for c in (raw / s).iterdir() if c.is_dir()})
    total = 0
    for split in splits:
        files = [
            (path, label)
            for label, name in enumerate(classes)
            if (raw / split / name).is_dir()
            for path in sorted((raw / split / name).iterdir())
        ]
        first = np.asarray(Image.open(files[0][0]))
        images = np.empty((len(files), 1, *first.shape[:2]), dtype=np.uint8)
        labels = np.empty(len(files), dtype=np.int64)
        for row, (path, label) in enumerate(files):
            with Image.open(path) as image:
                images[row, 0] = np.asarray(image.convert("L"))
            labels[row] = label
        if split == "train":
            pixels = torch.from_numpy(images).float().div_(255)
            json.dumps({"mean": [pixels.mean().item()], "std": [pixels.std().item()]})
            del pixels
        torch.save(
            {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)},
            out / f"{split}.pt",
        )
        total += len(files)
    return total


def kiln_prepare(raw: Path, out: Path) -> int:
    """What `python src/process_data.py` runs, minus interpreter start-up."""
    import yaml

    import kiln
    from kiln.processing import process_data

    kiln.prepare_dataset  # noqa: B018 - load the C++ core before timing, as the baseline imports PIL
    defaults = yaml.safe_load((REPO / "conf" / "process_data.yaml").read_text(encoding="utf-8"))
    manifest = process_data({**defaults, "raw_data_dir_path": str(raw), "processed_data_dir_path": str(out)})
    return sum(split.count for split in manifest.splits)


def worker(kind: str, raw: Path, out: Path) -> None:
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401 - both sides pay for torch before the clock starts

    prepare = kiln_prepare if kind == "kiln" else baseline_prepare
    started = time.perf_counter()
    images = prepare(raw, out)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": images, "seconds": seconds, "peak_rss_mb": peak_mb}))


def run_worker(kind: str, raw: Path, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--raw", str(raw), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ensure_raw_tree(raw: Path | None, cache: Path) -> Path:
    if raw is not None:
        return raw
    if (cache / "train").is_dir():
        return cache
    if not DEBIAN_IDX.is_dir():
        raise SystemExit(f"{DEBIAN_IDX} not found: `apt-get install dataset-fashion-mnist`, or pass --raw DIR")
    print(f"writing the Fashion-MNIST PNG tree to {cache} (once) ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln.data",
            "from-idx",
            "--idx-dir",
            str(DEBIAN_IDX),
            "--out",
            str(cache),
        ],
        check=True,
    )
    return cache


def same_arrays(kiln_dir: Path, baseline_dir: Path) -> bool:
    """kiln's splits (in shards) hold the baseline's <split>.pt pixels and labels."""
    import torch

    import kiln

    for split_file in sorted(p.name for p in baseline_dir.glob("*.pt")):
        images, labels = kiln.load_split(kiln_dir, split_file.removesuffix(".pt"))
        right = torch.load(baseline_dir / split_file, weights_only=True)
        if not (torch.equal(images, right["images"]) and torch.equal(labels, right["labels"])):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, help="image tree; default: full Fashion-MNIST as PNGs")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kiln-bench-fashion-mnist")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker", choices=["kiln", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.raw, args.out)
        return

    raw = ensure_raw_tree(args.raw, args.cache)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-prep-") as scratch:
        kiln_out, baseline_out = Path(scratch) / "kiln", Path(scratch) / "baseline"
        run_worker("kiln", raw, kiln_out)  # warm-up: page cache, first-touch costs
        kiln_runs, baseline_runs = [], []
        for _ in range(args.repeat):
            kiln_runs.append(run_worker("kiln", raw, kiln_out))
            baseline_runs.append(run_worker("baseline", raw, baseline_out))
        if not same_arrays(kiln_out, baseline_out):
            raise SystemExit("kiln and the baseline produced different arrays")
        output_mb = sum(p.stat().st_size for p in kiln_out.glob("*.pt")) / 2**20

    best_kiln = min(kiln_runs, key=lambda r: r["seconds"])
    best_baseline = min(baseline_runs, key=lambda r: r["seconds"])
    kiln_rate = best_kiln["images"] / best_kiln["seconds"]
    baseline_rate = best_baseline["images"] / best_baseline["seconds"]
    peak = max(r["peak_rss_mb"] for r in kiln_runs)
    budget = 2 * output_mb + 300
    runs = f"best of {args.repeat}"
    within = "within" if peak <= budget else "OVER"
    print(f"images: {best_kiln['images']} from {raw} on {os.cpu_count()} cores; identical arrays: yes")
    print(f"kiln      {kiln_rate:10.0f} images/s  ({runs}: {best_kiln['seconds']:.3f} s)")
    print(f"baseline  {baseline_rate:10.0f} images/s  ({runs}: {best_baseline['seconds']:.3f} s, PIL)")
    print(f"ratio     {kiln_rate / baseline_rate:10.2f} x   (target >= 5x)")
    print(f"kiln peak RSS {peak:.0f} MB; output {output_mb:.0f} MB; budget 2 x output + 300 MB =")
    print(f"  {budget:.0f} MB ({within})")


if __name__ == "__main__":
    main()
