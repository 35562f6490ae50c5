"""Benchmark: data-parallel training, 1 process against N processes under torchrun.

    python bench/distributed.py                          # CPU, gloo over loopback, 1 vs 2 processes
    python bench/distributed.py --models resnet8 --epochs 4
    python bench/distributed.py --device cuda --nprocs 1,8 --precision bf16   # NCCL, one GPU per process
    python bench/distributed.py --processed DIR          # a processed dataset (default: the embedded sample)

Each configuration is one `torchrun --standalone --nproc-per-node N` (N = 1 is the single-process
baseline: the same code path with a group of one) training kiln's C++ trainer with the same global
batch (--global-batch images per step, split evenly over the processes), so every row does the same
arithmetic. Prints per model and process count: seconds per epoch (median of the epochs after the
first), images/s, the share of the epoch rank 0 spent waiting on communication (gradient all-reduces
that backward did not hide, plus the epoch's metric reductions and broadcasts), the gradient bytes
all-reduced per step, and the speed-up over one process. On CPUs the processes share the machine's
cores (torchrun gives each OMP_NUM_THREADS=1 with N > 1, the single process keeps them all; --threads
sets one count for all), so the speed-up measures communication and scheduling overhead, not added
compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: trains --epochs epochs, rank 0 writes the figures to --out."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import kiln

    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if args.device == "cuda" else "gloo"
    options = {"device_id": torch.device(device)} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=300), **options)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {world} processes")
    trainer = kiln.Trainer(
        args.processed,
        model=args.model,
        precision=args.precision,
        device=device,
        train_batch_size=args.global_batch // world,
        train_limit=args.train_limit,
        seed=1,
        process_group=dist.group.WORLD.group_name,
    )
    epochs = [trainer.run_epoch() for _ in range(args.epochs)]
    if dist.get_rank() == 0:
        checkpoint = Path(args.out).with_suffix(".pt")
        trainer.save_checkpoint(checkpoint)
        weights = torch.load(checkpoint, weights_only=True)["model"]["state_dict"]
        # Gradients are all-reduced in the parameters' dtype: float32 (bf16 working copies on the CPU).
        gradient_bytes = sum(
            t.numel() * 4 for name, t in weights.items() if "running_" not in name and "num_batches" not in name
        )
        Path(args.out).write_text(
            json.dumps(
                {
                    "epochs": epochs,
                    "gradient_bytes": gradient_bytes,
                    "steps_per_epoch": -(-trainer.train_size // args.global_batch),
                    "train_size": trainer.train_size,
                    "backend": dist.get_backend(),
                }
            )
        )
    dist.destroy_process_group()


def measure(model: str, nproc: int, processed: Path, args: argparse.Namespace, scratch: Path) -> dict:
    out = scratch / f"{model}-{nproc}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--monitor-interval=0.5",
        str(Path(__file__).resolve()),
        "--worker",
        f"--model={model}",
        f"--processed={processed}",
        f"--out={out}",
        f"--epochs={args.epochs}",
        f"--device={args.device}",
        f"--precision={args.precision}",
        f"--global-batch={args.global_batch}",
        f"--train-limit={args.train_limit}",
    ]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    if result.returncode != 0:
        raise SystemExit(f"torchrun with {nproc} processes failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    figures = json.loads(out.read_text())
    timed = figures["epochs"][1:] or figures["epochs"]
    seconds = statistics.median(e["seconds"] for e in timed)
    communication = statistics.median(e["communication_seconds"] for e in timed)
    return {
        "model": model,
        "processes": nproc,
        "backend": figures["backend"],
        "seconds_per_epoch": seconds,
        "images_per_second": figures["train_size"] / seconds,
        "communication_share": communication / seconds,
        "gradient_mb_per_step": figures["gradient_bytes"] / 1e6,
        "steps_per_epoch": figures["steps_per_epoch"],
        "test_accuracy": figures["epochs"][-1]["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mnist_cnn,resnet8")
    parser.add_argument("--nprocs", default="1,2", help="process counts to compare, the first is the baseline")
    parser.add_argument("--processed", type=Path, help="a processed dataset (default: the embedded sample)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--global-batch", type=int, default=64, help="images per step, over all processes")
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="seconds one torchrun may take")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every configuration, interleaved; rows: the median round"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of every process (default: torchrun's, 1 per process when N > 1, all cores for N = 1)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory(prefix="kiln-bench-dist-") as tmp:
        scratch = Path(tmp)
        processed = args.processed
        if processed is None:
            import kiln

            processed = scratch / "processed"
            kiln.prepare_dataset(REPO / "data" / "sample", processed)
        rows = []
        nprocs = [int(n) for n in args.nprocs.split(",")]
        print(
            f"{'model':<10} {'procs':>5} {'backend':>7} {'s/epoch':>8} {'img/s':>8} {'comm':>6} "
            f"{'grad MB/step':>12} {'speed-up':>8} {'test acc':>8}"
        )
        for model in args.models.split(","):
            # Rounds interleave the process counts: a shared machine's speed drifts over minutes.
            measured = {nproc: [] for nproc in nprocs}
            for _ in range(args.rounds):
                for nproc in nprocs:
                    measured[nproc].append(measure(model, nproc, processed, args, scratch))
            baseline = None
            for nproc in nprocs:
                runs = sorted(measured[nproc], key=lambda r: r["seconds_per_epoch"])
                row = runs[len(runs) // 2]
                baseline = baseline or row["seconds_per_epoch"]
                row["speedup"] = baseline / row["seconds_per_epoch"]
                rows.append(row)
                print(
                    f"{model:<10} {nproc:>5} {row['backend']:>7} {row['seconds_per_epoch']:>8.3f} "
                    f"{row['images_per_second']:>8.0f} {row['communication_share']:>6.1%} "
                    f"{row['gradient_mb_per_step']:>12.2f} {row['speedup']:>7.2f}x {row['test_accuracy']:>8.3f}",
                    flush=True,
                )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
