"""Cost of the reference comparison's nearest-patch search (`patch_distances`), the old and the current formula side
by side in one run: `min(1 - Q @ B.T)` builds a second (cells, bank) matrix, `1 - max(Q @ B.T)` does not.

    python benchmarks/comparison_cost.py [--references 8] [--repeats 30]

Shapes of the main job: one query photo of 5 tiles of 16x16 DCT cells (42 channels) against `references` photos.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from kensa_vl.modeling.modeling_kensa_vl import patch_distances


def old_formula(query: torch.Tensor, bank: torch.Tensor, token_side: int) -> torch.Tensor:
    n, g, _, c = query.shape
    nearest = (1 - query.reshape(-1, c) @ bank.T).amin(-1)
    d = F.avg_pool2d(nearest.clamp_min(0).view(n, 1, g, g), 3, 1, 1, count_include_pad=False)
    return F.max_pool2d(d, g // token_side).flatten(1)


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    query = F.normalize(torch.randn(5, 16, 16, 42), dim=-1)
    bank = F.normalize(torch.randn(args.references * 5 * 256, 42), dim=-1)
    torch.testing.assert_close(patch_distances(query, bank, 4), old_formula(query, bank, 4))
    old = timed(lambda: old_formula(query, bank, 4), args.repeats)
    new = timed(lambda: patch_distances(query, bank, 4), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bank {len(bank)} cells")
    print(
        f"| formula | ms per query photo |\n|---|---|\n| min(1 - Q B^T) | {old:.1f} |\n| 1 - max(Q B^T) | {new:.1f} |"
    )
    print(f"speed-up: {old / new:.2f}x")


if __name__ == "__main__":
    main()
