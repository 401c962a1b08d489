"""KensaVL: a tiled, multi-encoder vision-language model for fine-detail, few-shot inspection.

Notable features:
- every tile of every image in a batch goes through each vision encoder in one batched call (chunked only to bound
  memory); any transformers vision model that returns patch hidden states works (SigLIP, CLIP, DINOv2, ...), CLS and
  register tokens are dropped by count;
- several layers per encoder, merged COMM-style (per-layer LayerNorm + Linear, softmax-weighted sum) or concatenated;
- encoders pooled onto a common patch grid and fused by channel concatenation (Eagle) or token interleaving (EWS);
- 2x2 pixel shuffle, then a LayerNorm + 2-layer GELU MLP projector into any causal LM;
- image features replace the `<image>` tokens with `masked_scatter`; a count mismatch raises `ValueError`.

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_kensa_vl import (
    CNN_MODEL_TYPES,
    DCT_MODEL_TYPE,
    PATCH_MODEL_TYPE,
    KensaVLConfig,
    build_encoder_config,
    encoder_patch_grid,
    encoder_width,
)

# Key of a cached support set's own image scores in `reference_features` (beside the encoders' cells).
REFERENCE_SCORES = "_scores"
# `locate`: a cell belongs to the defect when its log-distance is LOCATE_MARGIN above the supports' level and within
# LOCATE_RANGE of the peak's (at least e^-2 = 14% of its distance: near-identical photos give tiny, noisy distances)
LOCATE_MARGIN, LOCATE_RANGE = 0.05, 2.0
# transformers 5.2x renamed the cache argument and output field `past_key_values` -> `cache`.
CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class KensaVLModelOutputWithPast(BaseModelOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None  # (num_tiles, token positions per tile) logits; NaN: no references
    anomaly_loss: torch.FloatTensor | None = None  # with `anomaly_labels`
    image_scores: torch.FloatTensor | None = None  # (num_images,) kNN score per image; NaN: no references
    # with `return_reference_distances`: per image, the compared encoders' `nearest_distances` maps (None: no
    # references), what `locate_box` boxes
    reference_distances: tuple | None = None
    # with `return_reference_bank`: per sample, the bank a later image would compare with (`_compare`), what a
    # caller caches as that sample's `reference_features` (the support set's cells, encoded once)
    reference_bank: tuple | None = None


@dataclass
class KensaVLCausalLMOutputWithPast(CausalLMOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    anomaly_loss: torch.FloatTensor | None = None  # included in `loss`; computed by the backbone (`model`)
    image_scores: torch.FloatTensor | None = None
    reference_distances: tuple | None = None
    reference_bank: tuple | None = None


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


@torch.no_grad()  # a fixed metric (PatchCore's): no gradient flows through the nearest-neighbour search
def nearest_distances(query: torch.Tensor, bank: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Cosine distance of each cell of `query` (n, g, g, C), L2-normalised, to its nearest cell in `bank` (M, C),
    L2-normalised: `(n, g, g)`, at least 0. The similarities are taken in `chunk x chunk` blocks with a running
    max, never as one (cells, M) matrix: 4x faster on a CPU at 448 px tiles (it stays in cache) and bounded memory
    (BENCHMARKS.md)."""
    n, g, _, c = query.shape
    nearest = []
    for part in query.reshape(-1, c).to(bank.dtype).split(chunk):
        best = None
        for block in bank.split(chunk):
            similarity = (part @ block.T).amax(-1)
            best = similarity if best is None else torch.maximum(best, similarity)
        nearest.append(1 - best)
    return torch.cat(nearest).clamp_min(0).view(n, g, g)


def pooled_distances(nearest: torch.Tensor, token_side: int) -> torch.Tensor:
    """`nearest_distances` `(n, g, g)` averaged over the 3x3 neighbourhood and max-pooled onto a `token_side` grid:
    `(n, token_side^2)`."""
    d = F.avg_pool2d(nearest.unsqueeze(1), 3, 1, 1, count_include_pad=False)
    return F.adaptive_max_pool2d(d, token_side).flatten(1)


def patch_distances(query: torch.Tensor, bank: torch.Tensor, token_side: int, chunk: int = 2048) -> torch.Tensor:
    """`pooled_distances` of `query`'s cells against `bank`: `(n, token_side^2)`."""
    return pooled_distances(nearest_distances(query, bank, chunk), token_side)


def reference_level(reference_features: dict) -> float | None:
    """The supports' level `locate_box` measures a query against: the median kNN score of the support images of a
    cached support set (`REFERENCE_SCORES`), None without one."""
    scores = reference_features.get(REFERENCE_SCORES)
    return scores.float().median().item() if scores is not None and len(scores) else None


def stitch_tiles(cells: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An image's grid tiles' cell maps `(rows * cols, g, g)` (row-major, as the processor cuts them) -> the map of
    the whole image `(rows * g, cols * g)`."""
    g = cells.shape[-1]
    return cells[: rows * cols].reshape(rows, cols, g, g).permute(0, 2, 1, 3).reshape(rows * g, cols * g)


def peak_region_box(cells: torch.Tensor, threshold: float) -> tuple[list[float], float]:
    """The box around the connected region (8-neighbourhood) of cells above `threshold` that holds the map's largest
    cell, as `[x0, y0, x1, y1]` fractions of the map's width and height, with that cell's value. When no cell passes
    the threshold, the box of the largest cell alone."""
    h, w = cells.shape
    above = cells > threshold
    region = torch.zeros_like(above)
    region.view(-1)[cells.argmax()] = True
    while True:  # grow from the peak through cells above the threshold (flood fill as repeated 3x3 dilation)
        grown = F.max_pool2d(region[None, None].float(), 3, 1, 1)[0, 0].bool() & above | region
        if torch.equal(grown, region):
            break
        region = grown
    ys, xs = region.nonzero(as_tuple=True)
    box = [xs.min().item() / w, ys.min().item() / h, (xs.max().item() + 1) / w, (ys.max().item() + 1) / h]
    return box, cells.max().item()


def unit_cells(grids: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """The compared encoders' (`names`) cells, L2-normalised in float32: name -> `(n, g, g, C)`."""
    return {name: F.normalize(grids[name].float(), dim=-1) for name in names}


def reference_view(pixel_values: torch.Tensor, view: str) -> torch.Tensor:
    """Square tiles `(n, 3, T, T)` seen as one of `REFERENCE_VIEWS`: flipped left-right or up-down, or turned
    counter-clockwise by 90, 180 or 270 degrees."""
    if view == "hflip":
        return pixel_values.flip(-1)
    if view == "vflip":
        return pixel_values.flip(-2)
    return pixel_values.rot90(int(view.removeprefix("rot")) // 90, (-2, -1))


def thumbnail_tiles(image_grid: torch.Tensor) -> torch.Tensor:
    """`(N,)` bool over all tiles of `image_grid` (rows, cols, tiles per image): True for each image's thumbnail."""
    flags = [[False] * (rows * cols) + [True] * (tiles - rows * cols) for rows, cols, tiles in image_grid.tolist()]
    return torch.tensor(sum(flags, []), dtype=torch.bool, device=image_grid.device)


def scored_tiles(thumbnail: torch.Tensor) -> torch.Tensor:
    """The tiles whose tokens give an image's overall score: its grid tiles, or all tiles when it has no grid (one
    tile). A thumbnail sees the photo at a coarser scale than any grid tile, so its nearest-patch distances to the
    references are mostly scale noise: on KensaSynth's test split the largest distance over grid tiles ranked
    defective photos at 0.95 AUROC (k = 4), over all tiles at 0.88 (BENCHMARKS.md)."""
    return ~thumbnail if (~thumbnail).any() else torch.ones_like(thumbnail)


def locate_box(distances: list[torch.Tensor], rows: int, cols: int, level: float | None):
    """The defect's box from one image's nearest-reference distances, one `(tiles, g, g)` map per compared encoder
    (grid tiles first, as the processor cuts them): the maps are stitched, logged, brought to the finest grid and
    averaged; the region grows from the peak through cells above `level + LOCATE_MARGIN` (without a level, the map's
    95th percentile) and within `LOCATE_RANGE` of the peak (`peak_region_box`). Returns `(box, peak)`."""
    maps = [stitch_tiles(d, rows, cols).clamp_min(1e-4).log() for d in distances]
    side = max(m.shape[0] for m in maps) // rows
    cells = torch.stack([F.interpolate(m[None, None], (rows * side, cols * side))[0, 0] for m in maps]).mean(0)
    threshold = level + LOCATE_MARGIN if level is not None else cells.float().quantile(0.95).item()
    return peak_region_box(cells, max(threshold, cells.max().item() - LOCATE_RANGE))


class KensaVLReferenceComparison(nn.Module):
    """PatchCore inside the model, with a learned anomaly map.

    For each image with references (the earlier images of its prompt, or a cached support set), per compared
    encoder and per cell of that encoder's own patch grid: the cosine distance to the nearest cell of any reference
    tile, averaged over the 3x3 neighbourhood (PatchCore's locally aware patches) and max-pooled onto the visual
    tokens, and the farthest single cell under each token (a defect of a cell or two, which the mean dilutes); each
    raw and relative to the image's median.
    Their logarithms become one anomaly logit per visual token (trained on defect masks when they are given, see
    `anomaly_labels`): a linear term that starts as their mean (farther is more anomalous, so an untrained map
    already ranks like PatchCore) plus an MLP that starts at zero.

    The model receives it twice: the token logit and the image's largest logit become an embedding added to each
    visual token (through a last layer that starts at zero), and the image's summary becomes an embedding added to
    the image's closing `</img>` token and the text that follows it (AnomalyGPT's prompt embedding, see
    `_add_summaries`). The summary, over the image's grid tiles (`scored_tiles`): the largest, top-mean and mean
    logit, the image's kNN score, that score minus the prompt's level (see `forward`), and whether there is one."""

    PER_ENCODER = 4  # log-distances per encoder and token: 3x3 mean and farthest cell, raw and over the median

    def __init__(self, config: KensaVLConfig):
        super().__init__()
        self.encoders = config.reference_encoder_names()
        self.token_side = config.grid_size // config.pixel_shuffle
        width = config.text_config.hidden_size
        inputs = self.PER_ENCODER * len(self.encoders)
        self.linear = nn.Linear(inputs, 1)
        self.mlp = nn.Sequential(nn.Linear(inputs, 64), nn.GELU(), nn.Linear(64, 1))
        self.embed = nn.Sequential(nn.Linear(2, width), nn.GELU(), nn.Linear(width, width))
        self.summary = nn.Sequential(nn.Linear(6, width), nn.GELU(), nn.Linear(width, width))
        # how `_init_weights` starts them: the mean of the log-distances, and residuals that change nothing yet
        self.linear.kensa_init = "mean"
        self.mlp[-1].kensa_init = self.embed[-1].kensa_init = "zero"

    def features(self, grids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compared encoders' L2-normalised cells on their own grids: name -> `(n, g, g, C)`."""
        return unit_cells(grids, self.encoders)

    def distances(self, query: dict[str, torch.Tensor], bank: dict[str, torch.Tensor]):
        """`query` name -> (n, g, g, C) tiles of one image, `bank` name -> (M, C) -> (log-distances
        `(n, tokens_per_tile, PER_ENCODER * E)`, each encoder's `nearest_distances` `(n, g, g)`)."""
        out, nearest = [], [nearest_distances(query[name], bank[name]) for name in self.encoders]
        for cells in nearest:
            d = pooled_distances(cells, self.token_side)  # (n, tokens_per_tile)
            # the single farthest cell under each token: a defect of a cell or two, which the 3x3 mean dilutes
            far = F.adaptive_max_pool2d(cells.unsqueeze(1), self.token_side).flatten(1)
            out += [d, d / d.median().clamp_min(1e-6), far, far / far.median().clamp_min(1e-6)]
        return torch.stack(out, -1).clamp_min(1e-4).log(), nearest

    def forward(self, query, thumbnail: torch.Tensor, bank, level: torch.Tensor | None = None):
        """One image whose tiles are `thumbnail`-flagged `(n,)` against `bank` -> (token embeddings
        `(n, tokens_per_tile, D)`, anomaly logits `(n, tokens_per_tile)`, the summary embedding `(D,)`, the image's
        kNN score, each encoder's `nearest_distances`). The score is the largest log-distance over the grid tiles
        (untrained, PatchCore's); `level` is the median score of the earlier images of the prompt (each against the
        images before it), the prompt's own measure of how far good photos of this product lie from each other."""
        x, nearest = self.distances(query, bank)
        x = x.to(self.linear.weight.dtype)
        logits = (self.linear(x) + self.mlp(x)).squeeze(-1)
        selected = scored_tiles(thumbnail)
        scored = logits[selected].flatten()
        top = scored.topk(min(len(scored), logits.shape[-1])).values.mean()
        score = x[selected][..., 0 :: self.PER_ENCODER].mean(-1).max()  # 3x3 log-distance, mean over encoders
        relative, known = (score - level, 1.0) if level is not None else (torch.zeros_like(score), 0.0)
        image = torch.stack([scored.max(), top, scored.mean(), score, relative, torch.full_like(score, known)])
        summary = torch.stack([logits, image[0].expand_as(logits)], -1)
        return self.embed(summary), logits, self.summary(image), score.detach(), nearest


class KensaVLPreTrainedModel(PreTrainedModel):
    config_class = KensaVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, KensaVLLayerMerge) and hasattr(module, "layer_logits"):
            module.layer_logits.data.zero_()
        # Set per layer, not on the parent: 5.x skips custom-code modules without parameters of their own.
        start = getattr(module, "kensa_init", None)
        if start is not None:
            module.weight.data.fill_(1.0 / module.in_features if start == "mean" else 0.0)
            module.bias.data.zero_()


class KensaVLModel(KensaVLPreTrainedModel):
    """Vision towers + layer merges + projector + language model backbone (no LM head)."""

    def __init__(self, config: KensaVLConfig):
        super().__init__(config)
        if not config.vision_encoders:
            raise ValueError("KensaVLConfig.vision_encoders is empty: a KensaVL model needs at least one encoder.")
        attn = getattr(config, "_attn_implementation", None)
        towers, no_split = {}, set()
        for encoder in config.vision_encoders:
            cnn = encoder["config"]["model_type"] in CNN_MODEL_TYPES  # no attention to choose
            extra = {"attn_implementation": attn} if attn and not cnn else {}
            if encoder["config"]["model_type"] == DCT_MODEL_TYPE:
                tower = KensaVLDCTEncoder(encoder["config"])
            elif encoder["config"]["model_type"] == PATCH_MODEL_TYPE:
                tower = KensaVLPatchEncoder(encoder["config"])
            else:
                tower = AutoModel.from_config(build_encoder_config(encoder), **extra)
            no_split.update(getattr(tower, "_no_split_modules", None) or [])
            # 4.x wraps CLIP/SigLIP in `.vision_model`; 5.6+ does not. Unwrapping gives one key layout in both.
            towers[encoder["name"]] = getattr(tower, "vision_model", tower)
        self.vision_towers = nn.ModuleDict(towers)
        self.layer_merges = nn.ModuleDict(
            {
                e["name"]: KensaVLLayerMerge(encoder_width(e), len(e["feature_layers"]), e["layer_merge"])
                for e in config.vision_encoders
            }
        )
        self.multi_modal_projector = KensaVLProjector(config)
        if config.reference_comparison:
            self.reference_comparison = KensaVLReferenceComparison(config)
        self.language_model = AutoModel.from_config(config.text_config)
        no_split.update(getattr(self.language_model, "_no_split_modules", None) or [])
        self._no_split_modules = sorted(no_split)
        self._tower_kwargs = {}
        for encoder in config.vision_encoders:
            params = inspect.signature(self.vision_towers[encoder["name"]].forward).parameters
            image_size = encoder["config"].get("image_size", config.tile_size)
            needs_interp = "interpolate_pos_encoding" in params and image_size != config.tile_size
            self._tower_kwargs[encoder["name"]] = {"interpolate_pos_encoding": True} if needs_interp else {}
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @staticmethod
    def _tapped_hidden_states(tower: nn.Module, taps: list[int], pixel_values: torch.Tensor, tower_kwargs: dict):
        """Run a tower and return `hidden_states[i]` for each tap `i` (0: the first layer's input, -1: the last layer).

        Forward hooks on the encoder layers give the same indices as `output_hidden_states` in every transformers
        version (4.x's unwrapped CLIP/SigLIP transformers do not return hidden states) and keep only the taps.
        """
        if isinstance(tower, (KensaVLDCTEncoder, KensaVLPatchEncoder)):  # one "layer": every tap is its output
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
        captured, handles = {}, []

        def keep(index):
            def hook(module, args, kwargs, output=None):
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

    def _encode(self, encoder: dict, pixel_values: torch.Tensor) -> torch.Tensor:
        """One encoder over a chunk of tiles: `(n, 3, T, T)` in [0, 1] -> `(n, g, g, C)` on its own patch grid."""
        name = encoder["name"]
        tower = self.vision_towers[name]
        mean = torch.tensor(encoder["image_mean"], device=pixel_values.device, dtype=pixel_values.dtype)
        std = torch.tensor(encoder["image_std"], device=pixel_values.device, dtype=pixel_values.dtype)
        x = (pixel_values - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        n, tile, scales = len(x), x.shape[-1], encoder.get("scales", [1])
        for s in scales[1:]:  # S2-Wrapper: the tile at s x, cut into s x s sub-tiles of the native size
            big = F.interpolate(x[:n], scale_factor=s, mode="bilinear", align_corners=False)
            x = torch.cat([x, big.view(n, 3, s, tile, s, tile).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, tile, tile)])
        hidden_states = self._tapped_hidden_states(tower, encoder["feature_layers"], x, self._tower_kwargs[name])
        grid = encoder_patch_grid(encoder, self.config.tile_size)
        # (n, prefix + grid^2, C) each; CLS / register tokens come first and are dropped by count
        layers = [hidden[:, hidden.shape[1] - grid * grid :] for hidden in hidden_states]
        merged = self.layer_merges[name](layers)  # (n * sum(s^2), grid^2, C')
        merged = merged.reshape(len(merged), grid, grid, -1)
        out, start = [merged[:n]], n
        for s in scales[1:]:  # stitch each tile's sub-tiles and pool them back onto the tile's grid
            part = merged[start : start + n * s * s].view(n, s, s, grid, grid, -1)
            stitched = part.permute(0, 5, 1, 3, 2, 4).reshape(n, -1, s * grid, s * grid)
            out.append(F.avg_pool2d(stitched, s).permute(0, 2, 3, 1))
            start += n * s * s
        return torch.cat(out, -1) if len(out) > 1 else merged

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """Tiles `(N, 3, T, T)` in [0, 1] -> visual tokens `(N, tokens_per_tile, D)` in the LM's embedding space."""
        tile = self.config.tile_size
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, tile, tile):
            raise ValueError(f"pixel_values must be (num_tiles, 3, {tile}, {tile}), got {tuple(pixel_values.shape)}.")
        return self._project(self._grids(pixel_values))

    def _grids(self, pixel_values: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Each encoder's (or each of `names`') merged features on its own patch grid: name -> `(N, g, g, C)`."""
        chunk = self.config.vision_chunk_size or pixel_values.shape[0]
        grids = {}
        for encoder in self.config.vision_encoders:
            if names is not None and encoder["name"] not in names:
                continue
            weight = next(self.vision_towers[encoder["name"]].parameters(), None)
            x = pixel_values.to(weight.dtype) if weight is not None else pixel_values
            grids[encoder["name"]] = torch.cat(
                [self._encode(encoder, x[i : i + chunk]) for i in range(0, len(x), chunk)]
            )
        return grids

    def _project(self, grids: dict[str, torch.Tensor]) -> torch.Tensor:
        projector_dtype = next(self.multi_modal_projector.parameters()).dtype
        common, shuffled = self.config.grid_size, {}
        for name, grid in grids.items():
            if grid.shape[1] != common:  # average-pool onto the common grid (a CNN's need not be a multiple)
                grid = F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), common).permute(0, 2, 3, 1)
            shuffled[name] = pixel_shuffle(grid, self.config.pixel_shuffle).to(projector_dtype)
        return self.multi_modal_projector(shuffled)

    def reference_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The patch features `reference_comparison` compares against, name -> `(tiles * g * g, C)` per compared
        encoder: what a cached support prefix passes back as `reference_features` (one dict per sample)."""
        comparison = self.reference_comparison
        return self._bank(pixel_values, comparison.features(self._grids(pixel_values, comparison.encoders)))

    def _bank(self, pixel_values: torch.Tensor, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference tiles' cells as the comparison's bank, name -> `(cells, C)`: `features` (the tiles' own
        compared features, name -> `(n, g, g, C)`), then the same tiles in each of `config.reference_views`."""
        parts = {name: [f] for name, f in features.items()}  # no comparison module needed (the kNN baseline)
        for view in self.config.reference_views:
            seen = self._grids(reference_view(pixel_values, view).contiguous(), list(parts))
            for name, f in unit_cells(seen, parts).items():
                parts[name].append(f)
        return {name: torch.cat([f.reshape(-1, f.shape[-1]) for f in fs]) for name, fs in parts.items()}

    @torch.no_grad()
    def locate(self, pixel_values: torch.Tensor, image_grid: torch.Tensor, reference_features: dict):
        """Where one image differs most from its references: `(box, peak)`, the box `[x0, y0, x1, y1]` as fractions
        of the image's width and height, `peak` the largest cell's log-distance (`locate_box`). The level is the
        median kNN score of the support images (`reference_features[REFERENCE_SCORES]`, as the cached inspector
        keeps them). The rule was chosen on KensaSynth's validation split (docs/reference-comparison.md).
        `pixel_values` and `image_grid` hold the one image's tiles as the processor made them; `reference_features`
        is one sample's dict of `reference_features`."""
        if image_grid.shape[0] != 1 or int(image_grid[0, 2]) != pixel_values.shape[0]:
            raise ValueError(
                f"locate takes one image: image_grid must be (1, 3) and describe all {pixel_values.shape[0]} tiles, "
                f"got {tuple(image_grid.shape)} {image_grid.tolist()}."
            )
        comparison = self.reference_comparison
        features = comparison.features(self._grids(pixel_values, comparison.encoders))
        distances = [nearest_distances(features[n], reference_features[n].float()) for n in comparison.encoders]
        return locate_box(distances, *image_grid[0, :2].tolist(), reference_level(reference_features))

    def _compare(self, image_features, grids, input_ids, image_grid, reference_features, pixel_values, keep=False):
        """Compare every image that has references (the earlier images of its sample, plus
        `reference_features[sample]`, a cached support set, when given) with them. Returns the image features with
        the comparison's token embeddings added (with interleaved encoders, to each encoder's token of a position),
        the anomaly map `(N, positions)` per token position of a tile (`(grid_size / pixel_shuffle)^2`; NaN for
        images without references), the `</img>` embeddings as (rows, positions, embeddings), and each image's kNN
        score `(num_images,)` (NaN without references; a cached support set passes its own under
        `REFERENCE_SCORES`), per image the compared encoders' `nearest_distances` (None without references), and
        with `keep` per sample the bank a later image would compare with: the cached support set's cells, then every
        image's own, in every reference view (the cells `reference_features` gives, image by image; None for a
        sample without images)."""
        comparison = self.reference_comparison
        features = comparison.features(grids)  # name -> (N, g, g, C)
        thumbnail = thumbnail_tiles(image_grid)
        tiles, per_tile = image_grid[:, 2].tolist(), image_features.shape[1]
        streams = per_tile // comparison.token_side**2  # tokens per position: one per encoder when interleaved
        starts = [0, *torch.tensor(tiles).cumsum(0).tolist()]
        is_image = input_ids == self.config.image_token_id
        added = torch.zeros_like(image_features)
        anomaly = image_features.new_full(
            (len(image_features), comparison.token_side**2), float("nan"), dtype=torch.float32
        )
        ends, image = ([], [], []), 0
        scores = anomaly.new_full((len(tiles),), float("nan"))
        nearest, kept = [None] * len(tiles), []
        for row, row_tokens in enumerate(is_image.sum(1).tolist()):
            positions = is_image[row].nonzero().flatten()
            cached = None if reference_features is None else reference_features[row]
            banks = {name: [] if cached is None else [cached[name].float()] for name in features}
            levels = [] if cached is None else list(cached[REFERENCE_SCORES].float().to(anomaly.device))
            seen = 0
            while seen < row_tokens:
                first, last = starts[image], starts[image + 1]
                query = {name: f[first:last] for name, f in features.items()}
                if banks[comparison.encoders[0]]:
                    level = torch.stack(levels).median() if levels else None
                    delta, logits, summary, scores[image], nearest[image] = comparison(
                        query, thumbnail[first:last], {n: torch.cat(b) for n, b in banks.items()}, level
                    )
                    levels.append(scores[image])
                    added[first:last] = delta.repeat_interleave(streams, 1).to(added.dtype)
                    anomaly[first:last] = logits.float()
                    end = int(positions[seen + (last - first) * per_tile - 1]) + 1  # the image's `</img>`
                    if end < input_ids.shape[1]:
                        for out, value in zip(ends, (row, end, summary), strict=True):
                            out.append(value)
                seen += (last - first) * per_tile
                if seen < row_tokens or keep:  # a later image of the row (or a caller's later query) compares with it
                    for name, cells in self._bank(pixel_values[first:last], query).items():
                        banks[name].append(cells)
                image += 1
            if keep:
                kept.append({n: torch.cat(b) for n, b in banks.items()} if banks[comparison.encoders[0]] else None)
        return image_features + added, anomaly, ends, scores, tuple(nearest), tuple(kept) if keep else None

    def _add_summaries(self, inputs_embeds, input_ids, rows, starts, summaries):
        """Add each compared image's summary embedding to its `</img>` token (`starts`) and the text after it, up to
        the next `summary_stop_token_ids` token (the next image or chat turn) or the end of the input. The question
        about an image then carries its comparison, so the answer's first token (in the next turn, a few tokens on)
        reads it from nearby text instead of searching hundreds of visual tokens; the answer itself never carries it,
        in training as in generation."""
        stops = torch.isin(input_ids, torch.tensor(self.config.summary_stop_token_ids, device=input_ids.device))
        span_rows, span_cols, values = [], [], []
        for row, start, summary in zip(rows, starts, summaries, strict=True):
            after = stops[row, start:].nonzero().flatten() if self.config.summary_stop_token_ids else None
            stop = start + 1 if after is None else start + int(after[0]) if len(after) else input_ids.shape[1]
            span_rows += [row] * (stop - start)
            span_cols += range(start, stop)
            values.append(summary.expand(stop - start, -1))
        index = (torch.tensor(span_rows, device=input_ids.device), torch.tensor(span_cols, device=input_ids.device))
        return inputs_embeds.index_put(index, torch.cat(values).to(inputs_embeds.dtype), accumulate=True)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features) -> torch.Tensor:
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_tokens, n_features = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {n_tokens}, features: {n_features} "
                f"({image_features.shape[0]} tiles x {image_features.shape[1]} tokens per tile)."
            )
        return mask.unsqueeze(-1).expand_as(inputs_embeds)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        reference_features: list[torch.Tensor] | None = None,
        anomaly_labels: torch.Tensor | None = None,
        return_reference_distances: bool = False,
        return_reference_bank: bool = False,
        **kwargs,
    ) -> KensaVLModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = kwargs.pop("cache", None) or past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_grid is not None and pixel_values is not None:
            described = int(image_grid[:, 2].sum())
            if described != pixel_values.shape[0]:
                raise ValueError(f"image_grid describes {described} tiles, pixel_values has {pixel_values.shape[0]}.")
        image_features = anomaly_map = anomaly_loss = image_scores = nearest = bank = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            grids = self._grids(pixel_values)
            image_features = self._project(grids)
            if self.config.reference_comparison and image_grid is not None and input_ids is not None:
                image_features, anomaly_map, ends, image_scores, nearest, bank = self._compare(
                    image_features,
                    grids,
                    input_ids,
                    image_grid,
                    reference_features,
                    pixel_values,
                    keep=return_reference_bank,
                )
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))
            if anomaly_map is not None and ends[0]:
                inputs_embeds = self._add_summaries(inputs_embeds, input_ids, *ends)
            if anomaly_labels is not None and anomaly_map is not None:
                anomaly_loss = self.anomaly_map_loss(anomaly_map, anomaly_labels)
        elif self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must run the towers, or ZeRO-3 waits forever for a text-only rank's all-gathers.
            tile = self.config.tile_size
            dummy = self.get_image_features(inputs_embeds.new_zeros(1, 3, tile, tile))
            inputs_embeds = inputs_embeds + dummy.sum().to(inputs_embeds.dtype) * 0
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KEY: cache},
            **kwargs,
        )
        return KensaVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            anomaly_map=anomaly_map,
            anomaly_loss=anomaly_loss,
            image_scores=image_scores,
            reference_distances=nearest if return_reference_distances else None,
            reference_bank=bank,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY, None)},
        )

    def anomaly_map_loss(self, anomaly_map: torch.Tensor, anomaly_labels: torch.Tensor) -> torch.Tensor | None:
        """Class-balanced binary cross-entropy of the map against `anomaly_labels` (1 defect, 0 not, -1 unknown),
        times `config.anomaly_loss_weight`; None when no token with references has a known label. Computed here, in
        the backbone, so trainers that run the backbone with their own LM head (TRL's fused head) still get it."""
        if anomaly_labels.shape != anomaly_map.shape:
            raise ValueError(
                f"anomaly_labels must be (num_tiles, token positions per tile) = {tuple(anomaly_map.shape)}, "
                f"got {tuple(anomaly_labels.shape)}."
            )
        known = (anomaly_labels >= 0) & ~anomaly_map.isnan()
        if not known.any():
            return None
        target = anomaly_labels[known].float()
        # defects cover a few % of the tokens: weigh them as much as the rest, or the map learns "never"
        balance = (target == 0).sum() / (target == 1).sum().clamp_min(1)
        bce = F.binary_cross_entropy_with_logits(anomaly_map[known], target, pos_weight=balance)
        return self.config.anomaly_loss_weight * bce


class KensaVLForConditionalGeneration(KensaVLPreTrainedModel, GenerationMixin):
    """KensaVL with a language-model head: `model` (backbone) + `lm_head`, the layout TRL and PEFT expect."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: KensaVLConfig):
        super().__init__(config)
        self.model = KensaVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._no_split_modules = self.model._no_split_modules
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        reference_features: list[dict[str, torch.Tensor]] | None = None,
        anomaly_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> KensaVLCausalLMOutputWithPast:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, tile_size, tile_size)`): all tiles of all
                images of the batch, in [0, 1], as the processor returns them.
            image_grid (`torch.LongTensor` of shape `(num_images, 3)`): rows, cols and tiles per image (checked).
            labels (`torch.LongTensor` of shape `(batch, seq)`): next-token targets, -100 where ignored.
            cache: the KV cache under the name recent 5.x `generate` passes a caller's cache by (else
                `past_key_values`).
            reference_features (`list[dict]`, *optional*): per sample, the `reference_features` of support
                images already in the KV cache (with `reference_comparison`), and their own `image_scores` under
                `REFERENCE_SCORES`.
            anomaly_labels (`torch.FloatTensor` of shape `(num_tiles, tokens_per_tile)`, *optional*): 1 where a
                visual token covers a defect, 0 where it does not, -1 where unknown (the processor's
                `anomaly_labels`). With `reference_comparison`, their class-balanced binary cross-entropy against
                the anomaly map, times `config.anomaly_loss_weight`, is added to the loss.
            return_reference_distances (`bool`, *optional*): also return, per image, the compared encoders'
                nearest-reference cell distances (`reference_distances`; what `locate_box` boxes, so a caller need
                not compare the image again).
            return_reference_bank (`bool`, *optional*): also return, per sample, its images' cells as the bank a
                later image compares with (`reference_bank`: the cells `reference_features` would give, without
                encoding the images again).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid=image_grid,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            reference_features=reference_features,
            anomaly_labels=anomaly_labels,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        anomaly_loss = outputs.anomaly_loss
        if anomaly_loss is not None:
            loss = anomaly_loss if loss is None else loss + anomaly_loss
        return KensaVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            anomaly_map=outputs.anomaly_map,
            anomaly_loss=anomaly_loss,
            image_scores=outputs.image_scores,
            reference_distances=outputs.reference_distances,
            reference_bank=outputs.reference_bank,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY, None)},
        )

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_grid=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # Pixels go with the prefill only. 5.x flags it with `is_first_iteration`; 4.x re-sends pixels every step,
        # and a decode step there feeds exactly one new token. Without a cache every step is a full prefill.
        step_ids = model_inputs.get("input_ids")
        prefill = (
            bool(kwargs.get("is_first_iteration"))
            or (step_ids is not None and step_ids.shape[1] > 1)
            or not kwargs.get("use_cache", True)
        )
        if prefill:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_grid"] = image_grid
        return model_inputs


__all__ = ["KensaVLConfig", "KensaVLModel", "KensaVLForConditionalGeneration", "KensaVLPreTrainedModel"]
