"""KensaSynth generation speed: wall time for the issue's target (1,000 images + 5,000 episodes, 1024 px).

    python benchmarks/synth_speed.py                       # the target, all cores
    python benchmarks/synth_speed.py --num-images 200 --resolution 2048

Runs `generate` exactly as `kensa-vl synth --preview` does (into a temporary folder) and prints a markdown row.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from kensa_vl.eval.measure import cpu_model
from kensa_vl.train.data.synth import SynthConfig, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--num-episodes", type=int, default=5000)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    cfg = SynthConfig(num_images=args.num_images, num_episodes=args.num_episodes, resolution=args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = generate(cfg, Path(tmp) / "ks", preview=True, workers=args.workers)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"machine: {os.cpu_count()}-core {cpu_model()}, Python {platform.python_version()}")
    print("| images | episodes | resolution | workers | wall time | images/s | size on disk |")
    print("|---|---|---|---|---|---|---|")
    workers = args.workers or min(os.cpu_count() or 1, 8)
    print(
        f"| {cfg.num_images} | {cfg.num_episodes} | {cfg.resolution} | {workers} | {seconds:.1f} s | "
        f"{cfg.num_images / seconds:.1f} | {size / 2**20:.0f} MiB |"
    )


if __name__ == "__main__":
    main()
