"""What exporting progress to Prometheus costs a training step.

Runs one tiny real training loop (timm ``test_resnet``, CPU) three ways, interleaved in one
process so drift and noise hit all of them alike:

  off      the no-op ``Observer`` (what a run with ``metrics.port: 0`` and no Pushgateway does)
  served   ``PrometheusObserver`` with its /metrics server running, nobody scraping
  scraped  the same, scraped every second by a thread (15x the PodMonitor's 15 s interval)

in blocks of a few steps (the scraper runs only during 'scraped' blocks). Then times
``PrometheusObserver.on_step`` alone, the exporter's whole per-step cost, against the measured
step, and one scrape of /metrics. Prints median step times, the overhead of each mode against
``off`` (overall, and as the median of block-by-block ratios within a repetition), and the
per-step cost as a share of the step.

    python benchmarks/metrics_overhead.py [--steps 5] [--reps 60] [--scrape-hz 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
import timeit
import urllib.request

import torch
import torch.nn.functional as F

from service.outputs.events import Observer, Progress
from service.run.metrics import PrometheusObserver
from service.spec import parse_spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_spec():
    return parse_spec(
        {
            "kind": "FineTune",
            "name": "bench",
            "study": "overhead",
            "backbone": {"model": "test_resnet", "weights": "none"},
            "dataset": {"uri": "builtin://digits"},
        }
    )


def train_steps(model, opt, batches, observer: Observer, progress: Progress) -> list[float]:
    """The trainer's step, with the same timing and observer call; seconds per step."""
    times = []
    tick = time.perf_counter()
    for x, y in batches:
        got = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = time.perf_counter()
        progress.step += 1
        progress.train_loss = loss.item()
        progress.progress = min(progress.step / 10_000, 1.0)
        observer.on_step(progress, seconds=done - tick, wait_seconds=got - tick, images=len(y))
        times.append(done - tick)
        tick = done
    return times


class Scraper(threading.Thread):
    """GETs /metrics ``hz`` times a second while ``active`` is set."""

    def __init__(self, url: str, hz: float):
        super().__init__(daemon=True)
        self.url, self.period, self.count = url, 1 / hz, 0
        self.active, self.halt = threading.Event(), threading.Event()

    def run(self):
        while not self.halt.wait(self.period):
            if self.active.is_set():
                urllib.request.urlopen(self.url, timeout=5).read()
                self.count += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="steps per block")
    ap.add_argument("--reps", type=int, default=60, help="blocks per mode, interleaved")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--scrape-hz", type=float, default=1.0, help="scrapes per second")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 shared cores here)")
    args = ap.parse_args()

    import timm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [
        (torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 10, (args.batch,)))
        for _ in range(args.steps)
    ]
    spec = make_spec()
    port_served, port_scraped = free_port(), free_port()
    observers = {
        "off": Observer(),
        "served": PrometheusObserver(
            spec, port=port_served, pushgateway_url=None, addr="127.0.0.1"
        ),
        "scraped": PrometheusObserver(
            spec, port=port_scraped, pushgateway_url=None, addr="127.0.0.1"
        ),
    }
    scraper = Scraper(f"http://127.0.0.1:{port_scraped}/metrics", hz=args.scrape_hz)
    progress = Progress(run_id=spec.run_id, phase="Training")
    for o in observers.values():
        o.on_phase(progress)

    train_steps(model, opt, batches[:5], observers["off"], progress)  # warm-up
    scraper.start()
    steps: dict[str, list[float]] = {mode: [] for mode in observers}
    blocks: dict[str, list[float]] = {mode: [] for mode in observers}  # mean step per block
    for rep in range(args.reps):
        order = list(observers) if rep % 2 == 0 else list(reversed(observers))
        for mode in order:
            if mode == "scraped":
                scraper.active.set()
            times = train_steps(model, opt, batches, observers[mode], progress)
            steps[mode] += times
            blocks[mode].append(statistics.fmean(times))
            scraper.active.clear()
    scraper.halt.set()
    scraper.join()

    # The exporter's own per-step cost, measured alone with many repetitions.
    o = observers["served"]
    n = 20_000
    per_call = (
        timeit.timeit(
            lambda: o.on_step(progress, seconds=0.05, wait_seconds=0.001, images=64), number=n
        )
        / n
    )
    url = f"http://127.0.0.1:{port_served}/metrics"
    render = timeit.timeit(lambda: urllib.request.urlopen(url, timeout=5).read(), number=200) / 200
    for obs in observers.values():
        obs.close()

    med = {mode: statistics.median(t) for mode, t in steps.items()}
    print(
        f"test_resnet, batch {args.batch}, {args.size} px, CPU, {torch.get_num_threads()} threads; "
        f"{args.reps} interleaved blocks of {args.steps} steps per mode; "
        f"{scraper.count} scrapes of the 'scraped' endpoint"
    )
    # Paired: each block against the 'off' block of the same repetition, so load drift cancels.
    ratios = {
        mode: [b / o - 1 for b, o in zip(blocks[mode], blocks["off"], strict=True)]
        for mode in observers
    }
    paired = {mode: statistics.median(r) for mode, r in ratios.items()}
    # Standard error of a median: 1.2533 sigma / sqrt(n).
    stderr = {
        mode: 1.2533 * statistics.stdev(r) / len(r) ** 0.5 if len(r) > 1 else 0.0
        for mode, r in ratios.items()
    }
    print(f"{'mode':<8} {'median step':>12} {'vs off':>8} {'paired median':>14} {'+-':>7}")
    for mode, m in med.items():
        print(
            f"{mode:<8} {m * 1e3:>9.2f} ms {100 * (m / med['off'] - 1):>+7.2f}% "
            f"{100 * paired[mode]:>+13.2f}% {100 * stderr[mode]:>6.2f}%"
        )
    print(
        f"one scrape (HTTP GET included) takes {render * 1e3:.2f} ms: every 15 s that is "
        f"{100 * render / 15:.4f}% of the process' time"
    )
    print(
        f"on_step alone: {per_call * 1e6:.1f} us per call = "
        f"{100 * per_call / med['off']:.3f}% of the median step"
    )


if __name__ == "__main__":
    main()
