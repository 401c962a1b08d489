"""How forward time and peak memory grow with the tiles of one image and with the number of support images, for
KensaVL and its peers on the same axes (`benchmarks/peers.py`: same tower and LM size, random weights).

    python -m benchmarks.scaling [--plot docs/scaling.png] [--support-size 672]

Tiles: one image of `rows x cols` 448 px tiles (KensaVL's grid for n = 1..12 tiles; every model gets the same
photo). Supports: 0..8 support photos of `--support-size` px plus a query of the same size. Inference forward,
median of `--repeats`.
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from benchmarks.episode import photos
from benchmarks.peers import NAMES, build, tokenizer_with_peer_tokens
from kensa_vl.eval.measure import PeakMemory, machine, timed

GRIDS = [(1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (2, 3), (1, 7), (2, 4), (3, 3), (2, 5), (1, 11), (3, 4)]


def point(built, images, repeats: int) -> tuple[float, float, int]:
    inputs = built.inputs(images)
    with torch.no_grad():
        seconds = timed(lambda: built.model(**inputs), repeats, warmup=0)
        with PeakMemory() as memory:
            built.model(**inputs)
    return seconds, memory.peak / 2**20, inputs["input_ids"].shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", default=None)
    parser.add_argument("--support-size", type=int, default=672)
    parser.add_argument("--max-supports", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = tokenizer_with_peer_tokens()
    tiles, supports = {}, {}
    for name in tqdm(NAMES, desc="models"):
        built = build(name, tokenizer)
        built.model.eval()
        point(built, photos(1, 448), 1)  # warm-up
        for rows, cols in tqdm(GRIDS, desc=f"{name}: tiles", leave=False):
            image = photos(1, 448 * cols)[0].resize((448 * cols, 448 * rows))
            tiles.setdefault(name, []).append(point(built, [image], args.repeats))
        for k in tqdm(range(args.max_supports + 1), desc=f"{name}: supports", leave=False):
            supports.setdefault(name, []).append(point(built, photos(k + 1, args.support_size), args.repeats))
        del built
    print(machine())
    for title, xs, table in (
        ("tiles of one image (448 px each)", [r * c for r, c in GRIDS], tiles),
        (f"support photos ({args.support_size}² each, plus a query)", range(args.max_supports + 1), supports),
    ):
        print(f"\n{title}: forward s / peak MiB / sequence length")
        print("| x | " + " | ".join(NAMES) + " |\n|---|" + "---|" * len(NAMES))
        for i, x in enumerate(xs):
            cells = [f"{table[n][i][0]:.2f} / {table[n][i][1]:.0f} / {table[n][i][2]}" for n in NAMES]
            print(f"| {x} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(tiles, supports, [r * c for r, c in GRIDS], args.support_size, args.plot)


def plot(tiles: dict, supports: dict, tile_counts: list[int], support_size: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (table, xs, label) in enumerate(
        (
            (tiles, tile_counts, "448 px tiles in the image (KensaVL's grid)"),
            (supports, list(range(len(next(iter(supports.values()))))), f"support photos ({support_size}²)"),
        )
    ):
        for name, values in table.items():
            axes[0, column].plot(xs, [v[0] for v in values], "o-", label=name)
            axes[1, column].plot(xs, [v[1] for v in values], "o-", label=name)
        axes[0, column].set_ylabel("forward time (s)")
        axes[1, column].set_ylabel("peak memory (MiB)")
        axes[1, column].set_xlabel(label)
    axes[0, 0].legend()
    fig.suptitle("Same tower and LM size, random weights, CPU inference")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
