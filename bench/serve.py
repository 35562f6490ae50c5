"""Benchmark: kiln's model server vs a plain FastAPI + PyTorch server of the same model.

    python bench/serve.py                      # 1 and 16 concurrent clients, 10 s each
    python bench/serve.py --seconds 20 --workers 4
    python bench/serve.py --load python        # the Python load generator even where wrk is installed

Both servers run under the same gunicorn command (uvicorn workers, loopback port) and serve the
same weights: kiln's (`kiln_fastapi.main:APP`, C++ decode and predict) and bench/baseline_server.py
(PIL decode, `model(x)` per image, one torch thread per worker like kiln's default). One server runs
at a time. The load generator keeps N keep-alive connections busy with one-image JSON requests
(the Fashion-MNIST sample's test PNGs in turn) and records each request's latency: `wrk` (an
external load generator in C, Debian's package `wrk`) when it is installed, which sees the tail
that clients see, else an asyncio client in this process. Prints req/s, p50, p90 and p99 per server
and concurrency, and kiln's ratios (targets: >= 1.0x req/s and <= 1.0x p99 at 1 client, >= 1.5x
req/s and <= 0.7x p99 at 16).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from isa import add_isa_argument, apply_isa, cpu_isa  # noqa: E402
from train import sample_checkpoint  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(app: str, chdir: Path, env: dict[str, str], workers: int, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", app, "-b", f"127.0.0.1:{port}", "-w", str(workers)]
    command += ["-k", "uvicorn.workers.UvicornWorker", "--chdir", str(chdir)]
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{app} did not start:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return process, port
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{app} not ready in time:\n{log.read_text()}")


async def client(port: int, bodies: list[bytes], offset: int, stop_at: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    index = offset
    try:
        while time.perf_counter() < stop_at:
            body = bodies[index % len(bodies)]
            index += 1
            request = (
                b"POST /api/v1/model/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            started = time.perf_counter()
            writer.write(request)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"server answered {status!r}")
    finally:
        writer.close()


async def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(client(port, bodies, i, stop_at, latencies) for i in range(clients)))
    return latencies


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "rps": len(ordered) / seconds,
        "p50_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.90))] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


# The request bodies in turn, one per request; at the end one line of figures for wrk_load to read.
WRK_SCRIPT = """
bodies = {%s}
counter = 0
request = function()
  counter = counter %% #bodies + 1
  return wrk.format("POST", "/api/v1/model/predict", {["Content-Type"] = "application/json"}, bodies[counter])
end
done = function(summary, latency, requests)
  io.write(string.format("KILN-BENCH %%d %%d %%d %%d %%f %%f %%f\\n", summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def wrk_load(port: int, bodies: list[bytes], clients: int, seconds: float, scratch: Path) -> dict[str, float]:
    """wrk's figures for `clients` keep-alive connections over `seconds`."""
    script = scratch / "bench.lua"
    script.write_text(WRK_SCRIPT % ", ".join(f"[==[{body.decode()}]==]" for body in bodies))
    threads = min(clients, os.cpu_count() or 1)
    command = ["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s"]
    done = subprocess.run([*command, "-s", str(script), f"http://127.0.0.1:{port}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    figures = next(line for line in done.stdout.splitlines() if line.startswith("KILN-BENCH")).split()[1:]
    requests, duration_us, errors = (int(value) for value in figures[:3])
    p50, p90, p99 = (float(value) / 1000 for value in figures[4:])
    if errors:
        raise RuntimeError(f"wrk counted {errors} failed requests (non-2xx or socket errors):\n{done.stdout}")
    return {"rps": requests / (duration_us / 1e6), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per concurrency level")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="gunicorn -w for both servers")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--load", choices=["auto", "wrk", "python"], default="auto", help="load generator (auto: wrk if installed)"
    )
    add_isa_argument(parser)
    args = parser.parse_args()
    apply_isa(args.isa)
    print(f"CPU: {cpu_isa()}")
    use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk") is not None)
    if args.load == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk); or use --load python")

    images = sorted((REPO / "data" / "sample" / "test").glob("*/*.png"))[::25][:64]
    bodies = [
        json.dumps({"images": [{"id": i, "image": base64.b64encode(p.read_bytes()).decode()}]}).encode()
        for i, p in enumerate(images)
    ]
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-serve-") as scratch:
        scratch = Path(scratch)
        checkpoint = sample_checkpoint(scratch)
        servers = {
            "kiln": ("kiln_fastapi.main:APP", REPO / "src", {"PRED_MODEL_PATH": str(checkpoint)}),
            "baseline": ("baseline_server:APP", REPO / "bench", {"BASELINE_CHECKPOINT": str(checkpoint)}),
        }
        for name, (app, chdir, env) in servers.items():
            process, port = start_server(app, chdir, env, args.workers, scratch / f"{name}.log")
            try:
                asyncio.run(load(port, bodies, 4, 2.0))  # warm-up: every worker has predicted
                results[name] = {}
                for clients in args.clients:
                    if use_wrk:
                        results[name][clients] = wrk_load(port, bodies, clients, args.seconds, scratch)
                    else:
                        latencies = asyncio.run(load(port, bodies, clients, args.seconds))
                        results[name][clients] = summary(latencies, args.seconds)
                    r = results[name][clients]
                    print(
                        f"{name:8s} {clients:3d} clients  {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
                        f"  p90 {r['p90_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms",
                        flush=True,
                    )
            finally:
                process.terminate()
                process.wait(timeout=30)
    print(
        f"(gunicorn -w {args.workers} -k uvicorn.workers.UvicornWorker, one 28x28 PNG per request, "
        f"{os.cpu_count()} cores, load generator {'wrk' if use_wrk else 'asyncio (Python)'} on the same machine)"
    )
    targets = {1: (" (target >= 1.0x)", " (target <= 1.0x)"), 16: (" (target >= 1.5x)", " (target <= 0.7x)")}
    for clients in args.clients:
        ours, theirs = results["kiln"][clients], results["baseline"][clients]
        rps_target, p99_target = targets.get(clients, ("", ""))
        print(
            f"{clients:3d} clients: kiln/baseline req/s {ours['rps'] / theirs['rps']:5.2f}x{rps_target}, "
            f"p99 {ours['p99_ms'] / theirs['p99_ms']:5.2f}x{p99_target}"
        )


if __name__ == "__main__":
    main()
