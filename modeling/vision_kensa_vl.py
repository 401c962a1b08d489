"""KensaVL's vision side: from tiles in [0, 1] to visual tokens in the language model's embedding space.

- `build_towers`: one tower per encoder entry of the config: any transformers vision model that returns patch
  hidden states (SigLIP, CLIP, DINOv2, ResNet/ConvNeXt stages, ...) or KensaVL's own weight-free block-DCT encoder
  (`KensaVLDCTEncoder`), band-pass encoder (`KensaVLBandPassEncoder`) and direct-patch encoder
  (`KensaVLPatchEncoder`);
- `tapped_hidden_states`: several layers per tower, taken with forward hooks; `encode_tiles` drops CLS and register
  tokens by count, merges the layers (`KensaVLLayerMerge`: COMM's weighted sum, or concatenation) and adds the
  S2-Wrapper scales;
- `project_grids`: encoders average-pooled onto the common patch grid, 2x2 `pixel_shuffle`, then
  `KensaVLProjector` (LayerNorm + 2-layer GELU MLP; one over the concatenated encoders, or one per encoder with
  interleaved tokens).

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import inspect
import threading

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from .configuration_kensa_vl import (
    BANDPASS_MODEL_TYPE,
    BANDPASS_PLANES,
    CNN_MODEL_TYPES,
    DCT_MODEL_TYPE,
    PATCH_MODEL_TYPE,
    KensaVLConfig,
    build_encoder_config,
    encoder_patch_grid,
)


class KensaVLLayerMerge(nn.Module):
    """Merge the hidden states tapped from several layers of one encoder into one feature map."""

    def __init__(self, hidden_size: int, num_layers: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "weighted" and num_layers > 1:
            self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
            self.projs = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
            self.layer_logits = nn.Parameter(torch.zeros(num_layers))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        if len(layers) == 1:
            return layers[0]
        if self.mode == "concat":
            return torch.cat(layers, dim=-1)  # (N, P, C * L)
        weights = self.layer_logits.softmax(dim=0)
        return sum(w * proj(norm(h)) for w, norm, proj, h in zip(weights, self.norms, self.projs, layers, strict=True))


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class KensaVLProjector(nn.Module):
    """LayerNorm + 2-layer GELU MLP: one over the concatenated encoders, or one per encoder when interleaving."""

    def __init__(self, config: KensaVLConfig):
        super().__init__()
        out_dim = config.text_config.hidden_size
        hidden = config.projector_hidden_size or out_dim
        block = config.pixel_shuffle**2
        sizes = config.encoder_hidden_sizes()
        if config.fusion == "concat":
            self.mlps = nn.ModuleDict({"fused": _mlp(sum(sizes.values()) * block, hidden, out_dim)})
        else:
            self.mlps = nn.ModuleDict({name: _mlp(size * block, hidden, out_dim) for name, size in sizes.items()})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if "fused" in self.mlps:
            return self.mlps["fused"](torch.cat(list(features.values()), dim=-1))  # (N, L, D)
        projected = [self.mlps[name](x) for name, x in features.items()]  # E x (N, L, D)
        return torch.stack(projected, dim=2).flatten(1, 2)  # (N, L * E, D), tokens interleaved per position


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Space-to-depth: `(N, G, G, C)` -> `(N, (G/f)^2, C f^2)`."""
    n, g, _, c = x.shape
    x = x.view(n, g // factor, factor, g // factor, factor, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (g // factor) ** 2, c * factor * factor)


class KensaVLDCTEncoder(nn.Module):
    """Frequency-domain input (DocPedia): JPEG-style block DCT of YCbCr, the lowest coefficients of each block in
    zigzag order, signed-log compressed. No weights: a fixed local descriptor of texture and edges at a fine grid
    (one cell per `patch_size` block) that compares well across views of a product (reference comparison).

    Config keys: `patch_size` (block side), `luma_coefficients`, `chroma_coefficients`; `hidden_size` is their
    total (`luma + 2 * chroma`)."""

    def __init__(self, config: dict):
        super().__init__()
        block = config["patch_size"]
        self.block, self.luma, self.chroma = block, config["luma_coefficients"], config["chroma_coefficients"]
        if not 1 <= self.chroma <= self.luma <= block * block:
            raise ValueError(
                f"DCT encoder: need 1 <= chroma_coefficients <= luma_coefficients <= {block * block} "
                f"(patch_size {block}), got {self.chroma} and {self.luma}."
            )
        # Built here and in forward, not kept as buffers: `from_pretrained` leaves non-persistent buffers
        # uninitialised. The kernel is built on first use on a device and kept (a quarter of a 5-tile call otherwise).
        self.zigzag = sorted(range(block * block), key=lambda i: (i // block + i % block, i // block))
        self._kernel: torch.Tensor | None = None

    def basis(self, device) -> torch.Tensor:
        """The orthonormal DCT-II matrix `(k, k)`: row `u` is frequency `u` sampled at the block's pixels."""
        k, n = torch.meshgrid(
            torch.arange(self.block, device=device), torch.arange(self.block, device=device), indexing="ij"
        )
        basis = torch.cos(torch.pi * (2 * n + 1) * k / (2 * self.block)) * (2 / self.block) ** 0.5
        basis[0] /= 2**0.5
        return basis

    def kernel(self, device) -> torch.Tensor:
        """RGB block -> kept YCbCr coefficients as one linear map, `(luma + 2 * chroma, 3, k, k)`: the 2-D DCT basis
        (`kron(basis, basis)`, rows in zigzag order) times the colour conversion (Y, then Cb, then Cr)."""
        y = torch.tensor([0.299, 0.587, 0.114], device=device)
        cb = 0.564 * (torch.tensor([0.0, 0.0, 1.0], device=device) - y)
        cr = 0.713 * (torch.tensor([1.0, 0.0, 0.0], device=device) - y)
        basis = self.basis(device)
        dct = torch.kron(basis, basis)[self.zigzag]  # (k*k coefficients, k*k pixels)
        rows = [(colour, dct[:kept]) for colour, kept in ((y, self.luma), (cb, self.chroma), (cr, self.chroma))]
        weight = torch.cat([torch.einsum("c,rp->rcp", colour, coefficients) for colour, coefficients in rows])
        return weight.view(-1, 3, self.block, self.block)

    def forward(self, pixel_values: torch.Tensor, **_) -> torch.Tensor:
        """`(n, 3, T, T)` RGB in [0, 1] -> `(n, (T / patch_size)^2, luma + 2 * chroma)`. One strided convolution
        with `kernel`: 10x faster on a CPU than colour conversion and separable DCT as tensor ops (BENCHMARKS.md)."""
        pixels = pixel_values.float()
        if pixels.shape[-1] % self.block or pixels.shape[-2] % self.block:
            raise ValueError(
                f"DCT encoder: tile sides must be multiples of patch_size {self.block}, "
                f"got {tuple(pixels.shape[-2:])}."
            )
        if self._kernel is None or self._kernel.device != pixels.device:
            self._kernel = self.kernel(pixels.device)
        features = F.conv2d(pixels, self._kernel, stride=self.block).flatten(2).transpose(1, 2)
        return features.sign() * torch.log1p(10 * features.abs())


def gaussian_mean(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each pixel's Gaussian-weighted mean (`sigma` px) over the pixels of its own tile: a separable blur with zero
    padding divided by the same blur of ones, so a tile's border is averaged over what the tile shows and not over
    made-up pixels. `(n, c, h, w)` -> same shape."""
    radius = min(int(3 * sigma), max(x.shape[-2:]) - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma * sigma))
    ones = torch.ones_like(x[:1, :1])
    planes = torch.cat([x.flatten(0, 1).unsqueeze(1), ones])  # (n c + 1, 1, h, w): every plane, then the ones
    planes = F.conv2d(planes, kernel.view(1, 1, 1, -1), padding=(0, radius))
    planes = F.conv2d(planes, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return (planes[:-1] / planes[-1:]).view_as(x)


# a block's log-luminance variance below this is noise (a standard deviation of 0.01: 1% of the brightness)
CONTRAST_FLOOR = 1e-4
# added to a brightness or channel before its log: sensor noise in the darkest pixels does not become large changes
LOG_OFFSET = 0.03


class KensaVLBandPassEncoder(nn.Module):
    """Weight-free band-pass brightness and colour: what a low-contrast or low-frequency defect changes (a smear, a
    blotch, a sheen or colour change, a dent seen as shading) and the DCT cells' fine texture does not show
    (docs/real-surfaces.md). Log-luminance and chroma (Cb, Cr) of the tile, each as a Gaussian mean at `s` minus
    one at `4 s` for each of `sigmas` (px of the tile), averaged over each `patch_size` block; then one constant
    channel, `offset`. The constant makes the comparison's cosine distance between two cells about their squared
    Euclidean distance over `2 offset^2` (a brightness change's size is the evidence, not its direction alone).
    `planes` chooses what is band-passed (`BANDPASS_PLANES`): "luma" (log-luminance), "chroma" (Cb and Cr),
    "logchroma" (log R/G and log B/G: a colour change that multiplies the channels, a yellowing or a scorch, moves
    them alike on a dark surface and a pale one, where Cb and Cr move with the brightness), and "contrast", the log of
    each block's standard deviation of log-luminance, where texture is washed out or softened (a sheen, a smear) while
    the mean brightness hardly moves.

    Config keys: `patch_size`, `sigmas`, `offset` (default 1), `planes` (default luma and chroma); `hidden_size` is
    `channels * len(sigmas) + 1` (`bandpass_channels`)."""

    # a tile flipped or turned gives the same cells, moved (isotropic blurs of block means): reference views would
    # only repeat them in the bank (`KensaVLModel.reference_cells`)
    view_invariant = True

    def __init__(self, config: dict):
        super().__init__()
        self.block, self.sigmas, self.offset = config["patch_size"], list(config["sigmas"]), config.get("offset", 1.0)
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError(f"Band-pass encoder: sigmas must be positive pixel widths, got {self.sigmas}.")
        self.kinds = list(config.get("planes", BANDPASS_PLANES[:2]))
        if not self.kinds or set(self.kinds) - set(BANDPASS_PLANES) or len(set(self.kinds)) < len(self.kinds):
            raise ValueError(
                f"Band-pass encoder: planes must be distinct names of {BANDPASS_PLANES}, got {self.kinds}."
            )

    @staticmethod
    def planes(pixels: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] `(n, 3, h, w)` -> log-luminance (a gain cancels), Cb and Cr `(n, 3, h, w)`."""
        luma = 0.299 * pixels[:, :1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:]
        return torch.cat(
            [torch.log(luma + LOG_OFFSET), 0.564 * (pixels[:, 2:] - luma), 0.713 * (pixels[:, :1] - luma)], 1
        )

    def forward(self, pixel_values: torch.Tensor, **_) -> torch.Tensor:
        """`(n, 3, T, T)` RGB in [0, 1] -> `(n, (T / patch_size)^2, channels * len(sigmas) + 1)`."""
        x = pixel_values.float()
        if x.shape[-1] % self.block or x.shape[-2] % self.block:
            raise ValueError(
                f"Band-pass encoder: tile sides must be multiples of patch_size {self.block}, "
                f"got {tuple(x.shape[-2:])}."
            )
        # blurred on the grid of block means (sigma in cells), not at every pixel: tens of times cheaper, and the
        # blurs are about as wide as a block or wider, so the cells barely change (benchmarks/bandpass_encoder.py)
        planes = self.planes(x)
        means = F.avg_pool2d(planes, self.block)
        parts = {"luma": means[:, :1], "chroma": means[:, 1:]}
        if "logchroma" in self.kinds:
            logs = torch.log(x + LOG_OFFSET)
            parts["logchroma"] = F.avg_pool2d(torch.cat([logs[:, :1], logs[:, 2:]], 1) - logs[:, 1:2], self.block)
        if "contrast" in self.kinds:
            variance = (F.avg_pool2d(planes[:, :1] ** 2, self.block) - means[:, :1] ** 2).clamp_min(0)
            parts["contrast"] = 0.5 * torch.log(variance + CONTRAST_FLOOR)
        cells = torch.cat([parts[kind] for kind in self.kinds], 1)
        sigmas = [s / self.block for s in self.sigmas]
        bands = torch.cat([gaussian_mean(cells, s) - gaussian_mean(cells, 4 * s) for s in sigmas], 1)
        bands = bands.flatten(2).transpose(1, 2)
        return torch.cat([bands, bands.new_full((*bands.shape[:2], 1), self.offset)], -1)


class KensaVLPatchEncoder(nn.Module):
    """Direct patch input (Fuyu, OtterHD): each `patch_size` block of raw pixels, flattened, through one linear
    layer. No vision transformer: the cheapest way to reach a tile's full resolution, and the LM (or the other
    encoders it sits beside) does the seeing. Config keys: `patch_size`, `hidden_size`."""

    def __init__(self, config: dict):
        super().__init__()
        self.block = config["patch_size"]
        self.proj = nn.Linear(3 * self.block * self.block, config["hidden_size"])

    def forward(self, pixel_values: torch.Tensor, **_) -> torch.Tensor:
        """`(n, 3, T, T)` -> `(n, (T / patch_size)^2, hidden_size)`, patches in row-major order."""
        patches = F.unfold(pixel_values.to(self.proj.weight.dtype), self.block, stride=self.block)
        return self.proj(patches.transpose(1, 2))


WEIGHT_FREE = (KensaVLDCTEncoder, KensaVLBandPassEncoder, KensaVLPatchEncoder)  # KensaVL's own: no hidden layers


def build_towers(config: KensaVLConfig) -> tuple[nn.ModuleDict, list[str], dict[str, dict]]:
    """The config's vision towers by encoder name, the modules they must not be split at (device maps), and the
    keyword arguments each tower's forward takes (`interpolate_pos_encoding` where its image size is not the
    tile's)."""
    attn = getattr(config, "_attn_implementation", None)
    towers, no_split, tower_kwargs = {}, set(), {}
    for encoder in config.vision_encoders:
        model_type = encoder["config"]["model_type"]
        if model_type == DCT_MODEL_TYPE:
            tower = KensaVLDCTEncoder(encoder["config"])
        elif model_type == BANDPASS_MODEL_TYPE:
            tower = KensaVLBandPassEncoder(encoder["config"])
        elif model_type == PATCH_MODEL_TYPE:
            tower = KensaVLPatchEncoder(encoder["config"])
        else:
            extra = {"attn_implementation": attn} if attn and model_type not in CNN_MODEL_TYPES else {}
            tower = AutoModel.from_config(build_encoder_config(encoder), **extra)
        no_split.update(getattr(tower, "_no_split_modules", None) or [])
        # 4.x wraps CLIP/SigLIP in `.vision_model`; 5.6+ does not. Unwrapping gives one key layout in both.
        tower = towers[encoder["name"]] = getattr(tower, "vision_model", tower)
        params = inspect.signature(tower.forward).parameters
        image_size = encoder["config"].get("image_size", config.tile_size)
        needs_interp = "interpolate_pos_encoding" in params and image_size != config.tile_size
        tower_kwargs[encoder["name"]] = {"interpolate_pos_encoding": True} if needs_interp else {}
    towers = nn.ModuleDict(towers)
    freeze_unread(towers, config)
    return towers, sorted(no_split), tower_kwargs


def tower_layers(tower: nn.Module) -> tuple[nn.Module | None, nn.ModuleList | None]:
    """A tower's input stage and its sequence of layers whose outputs are `hidden_states[1:]`: a ViT's embeddings
    and encoder layers, a transformers CNN's stem and stages; (None, None) for KensaVL's own encoders and timm."""
    if isinstance(tower, WEIGHT_FREE) or hasattr(tower, "timm_model"):
        return None, None
    if getattr(tower.config, "model_type", None) in CNN_MODEL_TYPES:
        return tower.embedder, tower.encoder.stages
    encoder = getattr(tower, "encoder", None)
    return getattr(tower, "embeddings", None), getattr(encoder, "layers", None) or getattr(encoder, "layer", None)


def read_layers(tower: nn.Module, taps: list[int]) -> list[nn.Module]:
    """The layers of `tower_layers` whose outputs the taps read, directly or through a later tapped layer."""
    _, layers = tower_layers(tower)
    if layers is None:
        return []
    deepest = max(tap % (len(layers) + 1) for tap in taps)
    return list(layers[:deepest])


def freeze_unread(towers: nn.ModuleDict, config: KensaVLConfig) -> None:
    """Freeze every tower parameter the taps never read: the final norms and heads after the last layer, layers
    after the deepest tap (CLIP's default tap is the second-to-last layer) and DINOv2's mask token (KensaVL never
    masks patches). They would never get a gradient: plain DDP fails on them and optimizers keep state for them.
    Their weights stay in the checkpoint, so saved models keep their keys."""
    for encoder in config.vision_encoders:
        tower = towers[encoder["name"]]
        stem, layers = tower_layers(tower)
        if layers is None:
            continue
        read = {id(p) for layer in read_layers(tower, encoder["feature_layers"]) for p in layer.parameters()}
        read |= {id(p) for name, p in stem.named_parameters() if name != "mask_token"} if stem is not None else set()
        for parameter in tower.parameters():
            if id(parameter) not in read:
                parameter.requires_grad_(False)


def tapped_hidden_states(tower: nn.Module, taps: list[int], pixel_values: torch.Tensor, tower_kwargs: dict):
    """Run a tower and return `hidden_states[i]` for each tap `i` (0: the first layer's input, -1: the last layer).

    Forward hooks on the encoder layers give the same indices as `output_hidden_states` in every transformers
    version (4.x's unwrapped CLIP/SigLIP transformers do not return hidden states) and keep only the taps.
    """
    if isinstance(tower, WEIGHT_FREE):  # one "layer": every tap is its output
        return [tower(pixel_values)] * len(taps)
    if getattr(tower.config, "model_type", None) in CNN_MODEL_TYPES:  # stage maps (n, C, h, w) -> tokens
        out = tower(pixel_values=pixel_values, output_hidden_states=True)
        return [out.hidden_states[tap].flatten(2).transpose(1, 2) for tap in taps]
    if hasattr(tower, "timm_model"):  # transformers' timm wrapper: taps are timm stage indices, maps NCHW
        out = tower(pixel_values=pixel_values, output_hidden_states=list(taps), do_pooling=False)
        return [feature_map.flatten(2).transpose(1, 2) for feature_map in out.hidden_states]
    encoder = getattr(tower, "encoder", None)
    layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
    if layers is None:
        raise ValueError(f"{type(tower).__name__} has no `encoder.layers` / `encoder.layer` to tap features from.")
    wanted = [tap % (len(layers) + 1) for tap in taps]
    captured, handles, caller = {}, [], threading.get_ident()

    def keep(index):
        def hook(module, args, kwargs, output=None):
            if threading.get_ident() != caller:  # the same layers run in another thread's forward (a server)
                return
            value = output if output is not None else (args[0] if args else kwargs["hidden_states"])
            captured[index] = value[0] if isinstance(value, tuple) else value

        return hook

    for index in set(wanted):
        if index == 0:
            handles.append(layers[0].register_forward_pre_hook(keep(0), with_kwargs=True))
        else:
            handles.append(layers[index - 1].register_forward_hook(keep(index), with_kwargs=True))
    try:
        tower(pixel_values=pixel_values, **tower_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[index] for index in wanted]


def normalise(encoder: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """The shared [0, 1] tiles in one encoder's own normalisation (`image_mean`, `image_std`)."""
    mean = torch.tensor(encoder["image_mean"], device=pixel_values.device, dtype=pixel_values.dtype)
    std = torch.tensor(encoder["image_std"], device=pixel_values.device, dtype=pixel_values.dtype)
    return (pixel_values - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def tower_outputs(towers: nn.ModuleDict, config: KensaVLConfig, pixel_values: torch.Tensor, hidden: bool, attn: bool):
    """Every transformers tower's own outputs on the tiles at native scale, for callers who ask to see inside
    (`output_hidden_states`, `output_attentions`): `(hidden_states, attentions)`, each one tuple over the towers in
    config order (each tower's embeddings and layers; KensaVL's own encoders have none), None when not asked."""
    states, maps = [], []
    for encoder in config.vision_encoders:
        tower = towers[encoder["name"]]
        if tower_layers(tower)[1] is None:
            continue
        weight = next(tower.parameters())
        out = tower(pixel_values=normalise(encoder, pixel_values.to(weight.dtype)), output_hidden_states=hidden,
                    output_attentions=attn)  # fmt: skip
        states += list(getattr(out, "hidden_states", None) or [])
        maps += list(getattr(out, "attentions", None) or [])
    return (tuple(states) if hidden else None), (tuple(maps) if attn else None)


def encode_tiles(
    tower: nn.Module, merge: KensaVLLayerMerge, encoder: dict, pixel_values: torch.Tensor, tile_size: int, kwargs
) -> torch.Tensor:
    """One encoder over a chunk of tiles: `(n, 3, T, T)` in [0, 1] -> `(n, g, g, C)` on its own patch grid."""
    x = normalise(encoder, pixel_values)
    n, tile, scales = len(x), x.shape[-1], encoder.get("scales", [1])
    for s in scales[1:]:  # S2-Wrapper: the tile at s x, cut into s x s sub-tiles of the native size
        big = F.interpolate(x[:n], scale_factor=s, mode="bilinear", align_corners=False)
        x = torch.cat([x, big.view(n, 3, s, tile, s, tile).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, tile, tile)])
    hidden_states = tapped_hidden_states(tower, encoder["feature_layers"], x, kwargs)
    grid = encoder_patch_grid(encoder, tile_size)
    # (n, prefix + grid^2, C) each; CLS / register tokens come first and are dropped by count
    layers = [hidden[:, hidden.shape[1] - grid * grid :] for hidden in hidden_states]
    merged = merge(layers)  # (n * sum(s^2), grid^2, C')
    merged = merged.reshape(len(merged), grid, grid, -1)
    out, start = [merged[:n]], n
    for s in scales[1:]:  # stitch each tile's sub-tiles and pool them back onto the tile's grid
        part = merged[start : start + n * s * s].view(n, s, s, grid, grid, -1)
        stitched = part.permute(0, 5, 1, 3, 2, 4).reshape(n, -1, s * grid, s * grid)
        out.append(F.avg_pool2d(stitched, s).permute(0, 2, 3, 1))
        start += n * s * s
    return torch.cat(out, -1) if len(out) > 1 else merged


def project_grids(projector: KensaVLProjector, grids: dict[str, torch.Tensor], config: KensaVLConfig) -> torch.Tensor:
    """Each encoder's `(N, g, g, C)` grid, average-pooled onto the common grid and pixel-shuffled, through the
    projector: `(N, tokens_per_tile, D)`."""
    projector_dtype = next(projector.parameters()).dtype
    shuffled = {
        name: pixel_shuffle(grid, config.pixel_shuffle).to(projector_dtype)
        for name, grid in common_grids(grids, config).items()
    }
    return projector(shuffled)


def common_grids(grids: dict[str, torch.Tensor], config: KensaVLConfig) -> dict[str, torch.Tensor]:
    """Each encoder's `(N, g, g, C)` grid average-pooled onto the common `(N, G, G, C)` grid (a CNN's `g` need not
    be a multiple of `G`)."""
    common = config.grid_size
    return {
        name: grid if grid.shape[1] == common
        else F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), common).permute(0, 2, 3, 1)
        for name, grid in grids.items()
    }  # fmt: skip


def check_image_grid(image_grid: torch.Tensor | None, pixel_values: torch.Tensor | None) -> None:
    """`image_grid` (rows, cols, tiles per image) must describe exactly the tiles of `pixel_values`."""
    if image_grid is not None and pixel_values is not None:
        described = int(image_grid[:, 2].sum())
        if described != pixel_values.shape[0]:
            raise ValueError(f"image_grid describes {described} tiles, pixel_values has {pixel_values.shape[0]}.")


def split_by_sample(input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid: torch.Tensor, config):
    """The batch's flat tiles and images, per sample: `[(tiles, image_grid rows)]` in row order. A sample's tiles
    are its image placeholders over `tokens_per_tile`; its images, whole images until those tiles are used up."""
    tiles = ((input_ids == config.image_token_id).sum(1) // config.tokens_per_tile).tolist()
    counts, start = [], 0
    for row_tiles in tiles:
        end, used = start, 0
        while used < row_tiles:
            used, end = used + int(image_grid[end, 2]), end + 1
        counts.append(end - start)
        start = end
    return list(zip(pixel_values.split(tiles), image_grid.split(counts), strict=True))
