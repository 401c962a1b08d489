"""Cost of the band-pass encoder (`KensaVLBandPassEncoder`): the band-pass at full resolution, then averaged over each
7 px cell (the definition) against the band-pass on the grid of cell means (what the encoder does), side by side in
one run on the tile counts the main job meets (a query, 5 tiles; a 4-shot prompt, 25; its supports in the five
reference views, 125), with the DCT encoder beside them for scale, and how far the two band-pass versions differ:
the largest absolute difference and its ratio to the cells' spread.

    python -m benchmarks.bandpass_encoder [--tile 112] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kensa_vl.eval.measure import machine, timed
from kensa_vl.modeling.vision_kensa_vl import KensaVLBandPassEncoder, KensaVLDCTEncoder, gaussian_mean


def full_resolution(encoder: KensaVLBandPassEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """The band-pass computed at every pixel, then averaged over each cell: `(n, cells, channels)`."""
    planes = encoder.planes(pixels)
    bands = torch.cat([gaussian_mean(planes, s) - gaussian_mean(planes, 4 * s) for s in encoder.sigmas], 1)
    cells = F.avg_pool2d(bands, encoder.block).flatten(2).transpose(1, 2)
    return torch.cat([cells, cells.new_full((*cells.shape[:2], 1), encoder.offset)], -1)


def textured(tiles: int, side: int) -> torch.Tensor:
    """Tiles of a smooth random texture with a gradient: band-pass content at every scale."""
    noise = F.interpolate(torch.rand(tiles, 3, side // 8, side // 8), size=(side, side), mode="bicubic")
    ramp = torch.linspace(0, 0.3, side).view(1, 1, 1, side)
    return (0.3 + 0.4 * noise + ramp + 0.05 * torch.rand(tiles, 3, side, side)).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    sigmas = [3 * args.tile / 112, 6 * args.tile / 112]
    bandpass = KensaVLBandPassEncoder({"patch_size": 7, "sigmas": sigmas})
    dct = KensaVLDCTEncoder({"patch_size": 7, "luma_coefficients": 36, "chroma_coefficients": 3})
    print(f"{machine()}; {args.tile} px tiles, 7 px cells, sigmas {sigmas} px")
    print("| tiles | full resolution ms | cell grid (current) ms | speed-up | DCT encoder ms | max abs difference "
          "| difference / cells' std |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for tiles in (5, 25, 125):
        pixels = textured(tiles, args.tile)
        exact, fast = full_resolution(bandpass, pixels), bandpass(pixels)
        diff = (exact - fast)[..., :-1].abs().max().item()
        spread = exact[..., :-1].std().item()
        before = timed(lambda p=pixels: full_resolution(bandpass, p), args.repeats) * 1e3
        after = timed(lambda p=pixels: bandpass(p), args.repeats) * 1e3
        reference = timed(lambda p=pixels: dct(p), args.repeats) * 1e3
        print(f"| {tiles} | {before:.1f} | {after:.2f} | {before / after:.0f}× | {reference:.2f} | {diff:.1e} "
              f"| {diff / spread:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
