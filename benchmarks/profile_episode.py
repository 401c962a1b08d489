"""Where KensaVL's time goes in one few-shot episode (the model of `benchmarks/episode.py`): wall time per
top-level component, from forward hooks, for inference and for a training step's forward.

    python -m benchmarks.profile_episode [--shots 4] [--size 1344] [--support-tiles N]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.episode import photos
from benchmarks.peers import build, tokenizer_with_peer_tokens
from kensa_vl.eval.measure import component_times, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--size", type=int, default=1344)
    parser.add_argument("--support-tiles", type=int, default=None)
    parser.add_argument("--comparison", action="store_true", help="with the reference comparison on the DCT encoder")
    args = parser.parse_args()
    torch.manual_seed(0)
    built = build("KensaVL", tokenizer_with_peer_tokens(), dct=args.comparison)
    images = photos(args.shots + 1, args.size)
    tiles = [args.support_tiles] * args.shots + [12] if args.support_tiles else None
    inputs = built.inputs(images, tiles)
    model = built.model.eval()
    with torch.no_grad():
        model(**inputs)  # warm-up
        times = component_times(model, inputs)
    print(f"{machine()}; KensaVL, {args.shots} supports + query, all {args.size}²")
    print("| component | inference forward s | share |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} | {seconds / times['total']:.0%} |")


if __name__ == "__main__":
    main()
