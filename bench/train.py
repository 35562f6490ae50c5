"""Benchmark: one training epoch (train + test evaluation) of the template's model and optimizer.

    python bench/train.py                       # 10k-image train subset of Fashion-MNIST, full test set
    python bench/train.py --train-limit 0       # the full 60k train split
    python bench/train.py --epochs 2 --raw DIR  # any <raw>/<split>/<class>/<image> tree

Contenders, each in its own process, same model (pytorch/examples' MNIST CNN), Adadelta lr 1.3,
StepLR(0.7), batch size 32/100, same number of images:
  kiln          kiln.Trainer as `python src/train_model.py` runs it (precision=auto)
  template      the template's loop: PNG folder -> PIL -> Dataset -> DataLoader, fp32
  python-fp32   the plain in-memory loop: tensors in memory, randperm batches, torch.optim, fp32
  python-bf16   the same with channels-last + bf16 autocast (for reference: the fastest Python here)
Prints seconds per epoch (the best epoch of each process; with --epochs N each epoch's too), test
accuracy, and kiln's speed-up over each (with --epochs N also over the whole run); with --rounds N,
the median of N rounds' ratios (the shared machine's speed drifts by tens of percent over minutes, so
compare within rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isa import add_isa_argument, apply_isa, cpu_isa  # noqa: E402
from prep import ensure_raw_tree  # noqa: E402

LR, GAMMA, TRAIN_BS, TEST_BS, SEED = 1.3, 0.7, 32, 100, 1


def python_model():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Net(nn.Module):  # pytorch/examples mnist/main.py
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2)
            x = torch.flatten(self.dropout1(x), 1)
            x = self.dropout2(F.relu(self.fc1(x)))
            return F.log_softmax(self.fc2(x), dim=1)

    return Net()


def sample_checkpoint(scratch: Path) -> Path:
    """A kiln checkpoint of the MNIST-example CNN after a short epoch on the embedded sample: the
    weights the inference benchmarks serve (their speed does not depend on how well it learned)."""
    import kiln

    repo = Path(__file__).resolve().parents[1]
    kiln.prepare_dataset(repo / "data" / "sample", scratch / "processed")
    trainer = kiln.Trainer(scratch / "processed", train_limit=500, test_limit=100)
    trainer.run_epoch()
    checkpoint = scratch / "checkpoint.pt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint


def python_model_from_checkpoint(checkpoint: Path):
    """(model in eval mode, classes, mean, std) of a kiln checkpoint, in plain PyTorch."""
    import torch

    saved = torch.load(checkpoint, weights_only=True)
    model = python_model()
    model.load_state_dict(saved["model"]["state_dict"])
    model.eval()
    mean = torch.tensor(saved["normalization"]["mean"]).view(-1, 1, 1)
    std = torch.tensor(saved["normalization"]["std"]).view(-1, 1, 1)
    return model, saved["classes"], mean, std


def run_python_epochs(model, train_batches, test_batches, epochs: int, bf16: bool) -> list[dict]:
    import torch
    from torch.nn import functional as F

    optimizer = torch.optim.Adadelta(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA)
    results = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        for data, target in train_batches():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                output = model(data)
            loss = F.nll_loss(output.float(), target)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = total = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for data, target in test_batches():
                correct += (model(data).argmax(dim=1) == target).sum().item()
                total += len(target)
        scheduler.step()
        results.append({"seconds": time.perf_counter() - started, "test_accuracy": correct / total})
    return results


def contender_kiln(processed: Path, raw: Path, args) -> list[dict]:
    from kiln import Trainer
    from kiln.precision import resolve_precision

    trainer = Trainer(
        processed,
        lr=LR,
        gamma=GAMMA,
        train_batch_size=TRAIN_BS,
        test_batch_size=TEST_BS,
        seed=SEED,
        precision=resolve_precision("auto", "cpu"),
        train_limit=args.train_limit,
    )
    return [
        {"seconds": m["seconds"], "test_accuracy": m["test_accuracy"]}
        for m in (trainer.run_epoch() for _ in range(args.epochs))
    ]


def contender_template(processed: Path, raw: Path, args) -> list[dict]:
    import random

    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    manifest = json.loads((processed / "manifest.json").read_text())
    mean, std = manifest["normalization"]["mean"][0], manifest["normalization"]["std"][0]

    class PngFolder(Dataset):  # what torchvision's ImageFolder + ToTensor + Normalize do
        def __init__(self, split: str, limit: int) -> None:
            classes = sorted(p.name for p in (raw / split).iterdir())
            self.items = [(f, i) for i, c in enumerate(classes) for f in sorted((raw / split / c).iterdir())]
            if limit:
                self.items = random.Random(SEED).sample(self.items, limit)

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, index: int):
            path, label = self.items[index]
            with Image.open(path) as image:
                pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
            return ((pixels - mean) / std).unsqueeze(0), label

    torch.manual_seed(SEED)
    train = DataLoader(PngFolder("train", args.train_limit), batch_size=TRAIN_BS, shuffle=True)
    test = DataLoader(PngFolder("test", 0), batch_size=TEST_BS)
    return run_python_epochs(python_model(), lambda: train, lambda: test, args.epochs, bf16=False)


def in_memory(processed: Path, args, channels_last: bool):
    import torch

    import kiln

    manifest = json.loads((processed / "manifest.json").read_text())
    mean, std = manifest["normalization"]["mean"][0], manifest["normalization"]["std"][0]

    def load(split: str, limit: int):
        images, labels = kiln.load_split(processed, split)
        if limit:
            chosen = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))[:limit]
            images, labels = images[chosen], labels[chosen]
        images = images.float().div_(255).sub_(mean).div_(std)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    train_x, train_y = load("train", args.train_limit)
    test_x, test_y = load("test", 0)

    def train_batches():
        order = torch.randperm(len(train_y))
        for start in range(0, len(order), TRAIN_BS):
            index = order[start : start + TRAIN_BS]
            yield train_x[index], train_y[index]

    def test_batches():
        for start in range(0, len(test_y), TEST_BS):
            yield test_x[start : start + TEST_BS], test_y[start : start + TEST_BS]

    return train_batches, test_batches


def contender_python_fp32(processed: Path, raw: Path, args) -> list[dict]:
    import torch

    torch.manual_seed(SEED)
    train, test = in_memory(processed, args, channels_last=False)
    return run_python_epochs(python_model(), train, test, args.epochs, bf16=False)


def contender_python_bf16(processed: Path, raw: Path, args) -> list[dict]:
    import torch

    torch.manual_seed(SEED)
    train, test = in_memory(processed, args, channels_last=True)
    model = python_model().to(memory_format=torch.channels_last)
    return run_python_epochs(model, train, test, args.epochs, bf16=True)


CONTENDERS = {
    "kiln": contender_kiln,
    "template": contender_template,
    "python-fp32": contender_python_fp32,
    "python-bf16": contender_python_bf16,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, help="image tree; default: full Fashion-MNIST as PNGs")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kiln-bench-fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=10000, help="train images per epoch; 0 = all")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every contender; ratios: median of the rounds")
    parser.add_argument("--only", choices=list(CONTENDERS), action="append")
    parser.add_argument("--worker", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--processed", type=Path, help=argparse.SUPPRESS)
    add_isa_argument(parser)
    args = parser.parse_args()
    apply_isa(args.isa)

    if args.worker:
        import torch  # noqa: F401 - every contender pays for torch before its clock starts

        results = CONTENDERS[args.worker](args.processed, args.raw, args)
        print(json.dumps(results))
        return

    import torch

    print(f"CPU: {cpu_isa()}")
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    contenders = args.only or [name for name in CONTENDERS if native_bf16 or name != "python-bf16"]
    if not native_bf16 and not args.only:
        print("(python-bf16 skipped: this CPU class has no native bf16, where autocast emulates it ~10x slower)")
    raw = ensure_raw_tree(args.raw, args.cache)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-train-") as scratch:
        processed = Path(scratch) / "processed"
        import kiln

        kiln.prepare_dataset(raw, processed)
        # Rounds run the contenders one after another, round after round: on a shared machine whose
        # speed drifts, each round's ratios compare processes that ran minutes apart, not a whole run.
        rounds: list[dict[str, list[dict]]] = []
        for round_number in range(1, args.rounds + 1):
            results = {}
            for name in contenders:
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--raw",
                    str(raw),
                    "--processed",
                    str(processed),
                ]
                command += ["--train-limit", str(args.train_limit), "--epochs", str(args.epochs)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{done.stderr}")
                results[name] = json.loads(done.stdout.strip().splitlines()[-1])
                seconds = [r["seconds"] for r in results[name]]
                each = f"  (epochs: {', '.join(f'{t:.2f}' for t in seconds)})" if len(seconds) > 1 else ""
                print(
                    f"round {round_number}  {name:12s} {min(seconds):7.2f} s/epoch  "
                    f"test accuracy {results[name][-1]['test_accuracy']:.4f}{each}",
                    flush=True,
                )
            rounds.append(results)

    images = "all" if args.train_limit == 0 else str(args.train_limit)
    print(
        f"({images} train images/epoch, 10000 test images, {args.epochs} epoch(s), {args.rounds} round(s), "
        f"{os.cpu_count()} cores)"
    )
    if "kiln" in rounds[0]:
        # DESIGN.md's targets on AVX-512 with bf16; issue 17's on the AVX2 class (fp32 there).
        targets = {"template": 3.5, "python-fp32": 1.3} if native_bf16 else {"template": 3.0, "python-fp32": 1.5}
        for name in rounds[0]:
            if name == "kiln":
                continue
            ratios = sorted(
                min(r["seconds"] for r in results[name]) / min(r["seconds"] for r in results["kiln"])
                for results in rounds
            )
            target = f" (target >= {targets[name]}x)" if name in targets else ""
            spread = f"  [rounds: {', '.join(f'{r:.2f}' for r in ratios)}]" if len(ratios) > 1 else ""
            print(f"kiln vs {name:12s} {statistics.median(ratios):5.2f}x{target}{spread}")
            if args.epochs > 1:
                # Later epochs can run slower than the first (denormal optimizer state), so the whole run too.
                whole = sorted(
                    sum(r["seconds"] for r in results[name]) / sum(r["seconds"] for r in results["kiln"])
                    for results in rounds
                )
                print(f"  whole {args.epochs}-epoch run: {statistics.median(whole):5.2f}x")


if __name__ == "__main__":
    main()
