"""Cost of the DCT encoder (`KensaVLDCTEncoder`): colour conversion and the separable block DCT as tensor ops (what
it was) against one strided convolution with the combined kernel (what it is), side by side in one run, on the
tile counts the main job meets: a query (5 tiles), a 4-shot prompt (25), its supports in the five reference
views (100 more). With `--data`, also the main job's training step (the tiny model of `kensa-vl train`, random
weights; forward + backward of 4 KensaSynth training episodes) with each encoder, taking turns.

    python -m benchmarks.dct_encoder [--repeats 5] [--data outputs/kensa-synth-224]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kensa_vl.eval.measure import machine, timed
from kensa_vl.modeling.vision_kensa_vl import KensaVLDCTEncoder


def separable(encoder: KensaVLDCTEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """The encoder as it was: YCbCr planes, then `basis @ block @ basis.T` per 7x7 block, then the zigzag pick."""
    r, g, b = pixel_values.float().unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    ycc = torch.stack([y, 0.564 * (b - y), 0.713 * (r - y)], 1)
    n, _, side, _ = ycc.shape
    cells, k = side // encoder.block, encoder.block
    blocks = ycc.view(n, 3, cells, k, cells, k).permute(0, 2, 4, 1, 3, 5)  # (n, g, g, 3, k, k)
    basis = encoder.basis(ycc.device)
    coefficients = (basis @ blocks @ basis.T).flatten(-2)[..., encoder.zigzag]
    kept = [coefficients[..., 0, : encoder.luma], coefficients[..., 1:, : encoder.chroma].flatten(-2)]
    features = torch.cat(kept, -1)
    return (features.sign() * torch.log1p(10 * features.abs())).reshape(n, cells * cells, -1)


def training_step(data: str, repeats: int) -> tuple[float, float]:
    """Median seconds of the main job's training step with the separable encoder and with the current one."""
    from kensa_vl.train.build import build_tiny
    from kensa_vl.train.data.conversations import episode_conversations
    from kensa_vl.train.data.synth import load_synth
    from kensa_vl.train.pipeline import TINY
    from kensa_vl.train.sft import KensaCollator

    model, processor = build_tiny(**TINY)
    model.train()
    items, episodes = load_synth(data)
    rows = episode_conversations(items["train"], episodes["train"])
    collator = KensaCollator(processor, max_length=None, assistant_only_loss=True, token_side=model.config.token_side)
    batch = collator([rows[i] for i in range(4)])
    tower = model.model.vision_towers["dct"]
    current = tower.forward

    def step(forward) -> None:
        tower.forward = forward
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    encoders = {"separable": lambda pixels, **_: separable(tower, pixels), "convolution": current}
    times = {name: [] for name in encoders}
    for _ in range(repeats + 1):  # taking turns, so a slow spell of the machine falls on both; the first warms up
        for name, forward in encoders.items():
            times[name].append(timed(lambda f=forward: step(f), 1, warmup=0))
    return statistics.median(times["separable"][1:]), statistics.median(times["convolution"][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=None, help="a KensaSynth folder: also time the main job's training step")
    args = parser.parse_args()
    torch.manual_seed(0)
    encoder = KensaVLDCTEncoder({"patch_size": 7, "luma_coefficients": 36, "chroma_coefficients": 3})
    print(f"{machine()}; {args.tile} px tiles, 7 px blocks, 36 luma + 2 x 3 chroma coefficients")
    print("| tiles | separable ms | convolution (current) ms | speed-up | max abs difference |")
    print("|---|---|---|---|---|")
    for tiles in (5, 25, 125):
        pixels = torch.rand(tiles, 3, args.tile, args.tile)
        diff = (separable(encoder, pixels) - encoder(pixels)).abs().max().item()
        before = timed(lambda p=pixels: separable(encoder, p), args.repeats) * 1e3
        after = timed(lambda p=pixels: encoder(p), args.repeats) * 1e3
        print(f"| {tiles} | {before:.2f} | {after:.2f} | {before / after:.1f}× | {diff:.1e} |")
    if args.data:
        before, after = training_step(args.data, args.repeats)
        print(
            f"\nmain job's training step (4 episodes, forward + backward): separable {before:.2f} s, "
            f"convolution {after:.2f} s, {before / after:.2f}× faster"
        )


if __name__ == "__main__":
    main()
