"""The performance suite against LLaVA-NeXT, Idefics3 and InternVL, each benchmark in its own process:

    python -m benchmarks                 # all, tables on stdout (for BENCHMARKS.md), docs/scaling.png
    python -m benchmarks episode scaling # some

Each also runs alone: `python -m benchmarks.<name> --help`. Other scripts in this folder measure single design
choices (see BENCHMARKS.md).
"""

from __future__ import annotations

import subprocess
import sys
import time

SUITE = {
    "tokens": [],  # 1. visual tokens and pixels per token, each model's own processor
    "episode": ["--train"],  # 2-3. one 4-shot episode with a 1344² query: forward, training step, memory
    "inspect_latency": [],  # 4. cached vs recomputed per query at k = 1, 2, 4, 8; queries/s at batch 8
    "scaling": ["--plot", "docs/scaling.png"],  # 5. time and memory against tiles and support images
}


def main() -> None:
    chosen = sys.argv[1:] or list(SUITE)
    unknown = sorted(set(chosen) - set(SUITE))
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; choose from {list(SUITE)}")
    for name in chosen:
        print(f"\n## {name}\n", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *SUITE[name]], check=True)
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
