"""Cost of the DCT encoder (`KensaVLDCTEncoder`): colour conversion and the separable block DCT as tensor ops (what
it was) against one strided convolution with the combined kernel (what it is), side by side in one run, on the
tile counts the main job meets: a query (5 tiles), a 4-shot prompt (25), its supports in the five reference
views (100 more).

    python -m benchmarks.dct_encoder [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from kensa_vl.eval.measure import machine, timed
from kensa_vl.modeling.modeling_kensa_vl import KensaVLDCTEncoder


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
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


if __name__ == "__main__":
    main()
