"""Cost of the reference comparison's nearest-patch search (`nearest_distances`), its formulas side by side in one
run: `min(1 - Q @ B.T)` (two (cells, bank) matrices), `1 - max(Q @ B.T)` over 4096-row chunks (one such matrix
per chunk), and the current blocked running max (`nearest_distances`: 2048 x 2048 blocks).

    python -m benchmarks.comparison_cost [--repeats 3]

Two shapes: the main job's (one query photo of 5 tiles of 16x16 DCT cells, 42 channels, against 4 references) and
448 px tiles (10 tiles of 64x64 cells: a 1344² photo with 7 px DCT blocks, against 4 references).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kensa_vl.eval.measure import machine, timed
from kensa_vl.modeling.search_kensa_vl import nearest_distances

SHAPES = {"main job (112 px tiles)": (5, 16), "448 px tiles": (10, 64)}


def two_matrices(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    n, g, _, c = query.shape
    return torch.cat([(1 - part @ bank.T).amin(-1) for part in query.reshape(-1, c).split(4096)]).view(n, g, g)


def row_chunks(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    n, g, _, c = query.shape
    return 1 - torch.cat([(part @ bank.T).amax(-1) for part in query.reshape(-1, c).split(4096)]).view(n, g, g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{machine()}; {args.references} reference photos")
    print(
        "| shape | bank cells | min(1 - Q B^T) ms | 1 - max(Q B^T), row chunks ms | blocked (current) ms | speed-up |"
    )
    print("|---|---|---|---|---|---|")
    for label, (tiles, cells) in SHAPES.items():
        query = F.normalize(torch.randn(tiles, cells, cells, 42), dim=-1)
        bank = F.normalize(torch.randn(args.references * tiles * cells * cells, 42), dim=-1)
        expected = nearest_distances(query, bank)
        torch.testing.assert_close(row_chunks(query, bank).clamp_min(0), expected)
        torch.testing.assert_close(two_matrices(query, bank).clamp_min(0), expected)
        ms = [
            timed(lambda f=f, q=query, b=bank: f(q, b), args.repeats) * 1e3
            for f in (two_matrices, row_chunks, nearest_distances)
        ]
        print(f"| {label} | {len(bank)} | {ms[0]:.0f} | {ms[1]:.0f} | {ms[2]:.0f} | {ms[1] / ms[2]:.1f}× |")


if __name__ == "__main__":
    main()
