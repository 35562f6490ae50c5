"""Benchmark: `python src/batch_inferencing.py` vs the per-file PIL + PyTorch loop it replaces.

    python bench/batch_infer.py                 # Fashion-MNIST test split (10k PNGs), Debian's
                                                # dataset-fashion-mnist
    python bench/batch_infer.py --split train   # 60k PNGs

Both classify the same files with the same weights (a kiln checkpoint, loaded into the PyTorch
MNIST-example Net for the baseline) and write the same JSON lines. Each runs as its own process,
as a user runs it; the script prints images/s measured over the whole command (imports, model
load, every file, the output written) and over the classification loop alone, their ratios, and
checks that both predicted the same classes. kiln runs with its default `inference.precision=auto`
(int8 on x86-64 CPUs with AVX2; `--precision bf16|fp32` to compare), the baseline in fp32 as users write it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa import add_isa_argument, apply_isa, cpu_isa  # noqa: E402
from prep import ensure_raw_tree  # noqa: E402
from train import python_model_from_checkpoint, sample_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def baseline(checkpoint: Path, input_dir: Path, output: Path) -> float:
    """The template's batch_inferencing.py loop: one file at a time through PIL and the model."""
    import datetime

    import numpy as np
    import torch
    from PIL import Image

    model, classes, mean, std = python_model_from_checkpoint(checkpoint)
    started = time.perf_counter()
    with open(output, "w") as out, torch.no_grad():
        for path in sorted(input_dir.glob("**/*.png")):
            with Image.open(path) as image:
                pixels = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32)).unsqueeze(0) / 255
            probabilities = torch.softmax(model(((pixels - mean) / std).unsqueeze(0)), dim=1)[0]
            probability, label = probabilities.max(0)
            line = {
                "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
                "filepath": str(path.resolve()),
                "prediction": classes[int(label)],
                "probability": float(probability),
            }
            out.write(json.dumps(line) + "\n")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, help="image tree; default: full Fashion-MNIST as PNGs")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kiln-bench-fashion-mnist")
    parser.add_argument("--split", default="test")
    parser.add_argument("--precision", default="auto", help="inference.precision for kiln (default: auto)")
    parser.add_argument("--worker", nargs=3, metavar=("CHECKPOINT", "INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    add_isa_argument(parser)
    args = parser.parse_args()
    apply_isa(args.isa)
    if args.worker:
        print(json.dumps({"loop_seconds": baseline(*map(Path, args.worker))}))
        return
    print(f"CPU: {cpu_isa()}")

    raw = ensure_raw_tree(args.raw, args.cache)
    input_dir = raw / args.split
    # Both sides read the files from the page cache: read them once first (the first side to run
    # would otherwise pay for the disk alone).
    files = sum(len(path.read_bytes()) > 0 for path in input_dir.glob("**/*.png"))
    with tempfile.TemporaryDirectory(prefix="kiln-bench-infer-") as scratch:
        scratch = Path(scratch)
        checkpoint = sample_checkpoint(scratch)

        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                str(REPO / "src" / "batch_inferencing.py"),
                f"inference.model_path={checkpoint}",
                f"inference.input_data_dir={input_dir}",
                "inference.file_check_glob=**/*.png",
                f"inference.precision={args.precision}",
                f"hydra.run.dir={scratch / 'kiln-out'}",
                f"log_dir={scratch / 'logs'}",
            ],
            capture_output=True,
            text=True,
            cwd=scratch,
        )
        kiln_total = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"batch_inferencing.py failed:\n{done.stdout}\n{done.stderr}")
        kiln_loop = float(done.stdout.split("Classified ")[1].split(" in ")[1].split("s ")[0])
        precision = done.stdout.split(" classes, ")[1].split(")")[0]

        started = time.perf_counter()
        base = subprocess.run(
            [sys.executable, __file__, "--worker", str(checkpoint), str(input_dir), str(scratch / "base.jsonl")],
            capture_output=True,
            text=True,
        )
        base_total = time.perf_counter() - started
        if base.returncode != 0:
            raise SystemExit(f"baseline failed:\n{base.stderr}")
        base_loop = json.loads(base.stdout.strip().splitlines()[-1])["loop_seconds"]

        def predictions(path: Path) -> dict[str, str]:
            return {(d := json.loads(line))["filepath"]: d["prediction"] for line in path.open()}

        ours, theirs = predictions(scratch / "kiln-out" / "batch-infer-res.jsonl"), predictions(scratch / "base.jsonl")
        agree = sum(ours[path] == theirs.get(path) for path in ours) / len(ours)

    print(f"{files} images ({input_dir}); kiln predicted in {precision}, the baseline in fp32")
    print(
        f"whole command  kiln {files / kiln_total:8.0f} img/s   per-file PIL loop {files / base_total:7.0f} img/s"
        f"   ratio {base_total / kiln_total:5.2f}x (target >= 10x)"
    )
    print(
        f"classification kiln {files / kiln_loop:8.0f} img/s   per-file PIL loop {files / base_loop:7.0f} img/s"
        f"   ratio {base_loop / kiln_loop:5.2f}x"
    )
    print(f"same predicted class for {agree:.2%} of the images")


if __name__ == "__main__":
    main()
