"""KensaVL configuration.

Shipped to the Hub as remote code: imports only torch/transformers and siblings.
"""

from __future__ import annotations

import copy

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING

# Per-family defaults for the keys of one encoder entry. `feature_layers` index `hidden_states`
# (0 = embeddings, -1 = last layer), ViP-LLaVA / COMM style taps are lists of several indices.
ENCODER_DEFAULTS = {
    "siglip_vision_model": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "feature_layers": [-1]},
    "clip_vision_model": {
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "feature_layers": [-2],
    },
    "dinov2": {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "feature_layers": [-1]},
    "dinov2_with_registers": {
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "feature_layers": [-1],
    },
}
# The DCT encoder (`KensaVLDCTEncoder`) is KensaVL's own, with no weights: it converts RGB itself.
DCT_MODEL_TYPE = "kensa_dct"
ENCODER_DEFAULTS[DCT_MODEL_TYPE] = {
    "image_mean": [0.0, 0.0, 0.0],
    "image_std": [1.0, 1.0, 1.0],
    "feature_layers": [-1],
}
# The band-pass encoder (`KensaVLBandPassEncoder`): KensaVL's own, no weights, converts RGB itself.
BANDPASS_MODEL_TYPE = "kensa_bandpass"
ENCODER_DEFAULTS[BANDPASS_MODEL_TYPE] = dict(ENCODER_DEFAULTS[DCT_MODEL_TYPE])
# what the band-pass encoder may band-pass, with its channels: log-luminance, Cb and Cr, log local contrast, log colour
# ratios
BANDPASS_PLANES = ("luma", "chroma", "contrast", "logchroma")


def bandpass_channels(planes) -> int:
    """The band-pass encoder's channels per scale for `planes` (chroma is two, Cb and Cr; logchroma two, log R/G
    and log B/G)."""
    return sum(2 if plane in ("chroma", "logchroma") else 1 for plane in planes)


# Extra views of each reference tile that `reference_views` adds to the comparison's bank (square tiles: all keep
# the tile's shape): a flip or a quarter turn of a good photo is still a good photo.
REFERENCE_VIEWS = ("hflip", "vflip", "rot90", "rot180", "rot270")
# Direct patch input (Fuyu, OtterHD): `KensaVLPatchEncoder`, a linear projection of raw pixel patches.
PATCH_MODEL_TYPE = "kensa_patch"
ENCODER_DEFAULTS[PATCH_MODEL_TYPE] = {
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "feature_layers": [-1],
}
# transformers CNN backbones: `feature_layers` index `hidden_states` (0: the stem, 1..: the stages' outputs)
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
CNN_MODEL_TYPES = ("resnet", "convnext", "convnextv2")
for _cnn in CNN_MODEL_TYPES:
    ENCODER_DEFAULTS[_cnn] = {**IMAGENET, "feature_layers": [-2]}
FALLBACK_ENCODER_DEFAULTS = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "feature_layers": [-1]}
LAYER_MERGES = ("weighted", "concat")
FUSIONS = ("concat", "interleave")


def _config_dict(config) -> dict:
    return config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)


def build_encoder_config(encoder: dict) -> PretrainedConfig:
    """The transformers config of one encoder entry (SigLIP, CLIP vision, DINOv2, ...)."""
    config = dict(encoder["config"])
    model_type = config.pop("model_type")
    if model_type == "siglip_vision_model":
        config["vision_use_head"] = False  # the pooling head is never used: patch tokens only
    return CONFIG_MAPPING[model_type](**config)


def _cnn_stage(encoder: dict, tap: int) -> tuple[int, int]:
    """(channels, stride) of `hidden_states[tap]` of a transformers ResNet / ConvNeXt: the stem has stride 4, the
    first stage keeps it, each later stage halves the map."""
    config = encoder["config"]
    widths = [config.get("embedding_size") or config["hidden_sizes"][0], *config["hidden_sizes"]]
    index = tap % len(widths)
    return widths[index], 4 * 2 ** max(index - 1, 0)


def encoder_width(encoder: dict) -> int:
    """Channels of one tapped layer (timm CNN entries give `hidden_size` for their chosen stage)."""
    if encoder["config"]["model_type"] in CNN_MODEL_TYPES:
        return _cnn_stage(encoder, encoder["feature_layers"][0])[0]
    return encoder.get("hidden_size") or encoder["config"]["hidden_size"]


def encoder_patch_grid(encoder: dict, tile_size: int) -> int:
    """Side of the patch grid one encoder produces for a `tile_size` tile (CNNs: the stride of the tapped stage;
    timm CNNs: `feature_stride`)."""
    if encoder["config"]["model_type"] in CNN_MODEL_TYPES:
        strides = {_cnn_stage(encoder, tap)[1] for tap in encoder["feature_layers"]}
        if len(strides) > 1:
            raise ValueError(
                f"Encoder {encoder['name']!r}: the tapped stages {encoder['feature_layers']} have different strides "
                f"{sorted(strides)}; tap stages of one stride."
            )
        patch_size = strides.pop()
    else:
        patch_size = encoder.get("feature_stride") or encoder["config"]["patch_size"]
    if tile_size % patch_size:
        raise ValueError(
            f"Encoder {encoder['name']!r}: tile_size {tile_size} is not a multiple of its patch_size {patch_size}."
        )
    return tile_size // patch_size


def check_coreset(ratio: float) -> float:
    """`reference_coreset`, checked where it is set and where it is read (a setting passed to `from_pretrained` skips
    `__init__`)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"reference_coreset is the share of cells kept, in (0, 1]; got {ratio}.")
    return ratio


def check_views(views: list[str], setting: str = "reference_views") -> list[str]:
    """Views of `REFERENCE_VIEWS`, each once (the config's `reference_views`, a training stage's bank views)."""
    if set(views) - set(REFERENCE_VIEWS) or len(set(views)) != len(views):
        raise ValueError(f"{setting} must be distinct views of {REFERENCE_VIEWS}, got {views}.")
    return views


class KensaVLConfig(PretrainedConfig):
    r"""
    Configuration of a KensaVL model: one or more vision encoders, a projector and a decoder language model.

    Args:
        text_config (`dict` or `PretrainedConfig`): config of any causal LM (llama, qwen2, phi3, mistral, ...).
        vision_encoders (`list[dict]`): one entry per encoder with keys `name`, `config` (a transformers vision config
            or its dict, with `model_type`: a ViT such as SigLIP, CLIP or DINOv2; a CNN, `resnet` or `convnext`, whose
            `feature_layers` pick stages of one stride; KensaVL's own `kensa_dct` (block-DCT coefficients, DocPedia),
            `kensa_bandpass` (band-passed brightness and colour) or `kensa_patch` (a linear projection of raw pixel
            patches, Fuyu)), and optionally `feature_layers`, `layer_merge` (`"weighted"`: COMM's softmax-weighted sum
            of per-layer LayerNorm + Linear; `"concat"`), `scales` (S2-Wrapper: `[1, 2]` also encodes each tile at 2x
            as 2x2 sub-tiles in the same call, stitched, average-pooled back to the tile's grid and concatenated along
            channels; default `[1]`), `image_mean`, `image_std` (each encoder normalises the shared [0, 1] pixels
            itself), `verdict_scale` and `verdict_margin` (with `reference_comparison`: the encoder's excess over its
            level enters the verdict as `verdict_scale * excess - verdict_margin`; 1 and 0), `locate` (whether
            its cells place the defect's box and heatmap, `locate_box`; default true) and `own_window` (its cells
            are also compared with the image's own cells outside a window of this share of the image's longer side,
            `own_nearest`; default none), `masks_background` (its cells tell the product from its background, and
            every compared encoder's cells on the background are left out of the score, heatmap and box where an
            image shows one, `product_mask`: AnomalyDINO's masking for objects; at most one entry; default false).
            Encoder grids are
            average-pooled onto the smallest one.
        fusion (`str`): `"concat"` (Eagle: encoders on a common grid, channels concatenated; default) or
            `"interleave"` (Eyes Wide Shut: each encoder projected on its own, tokens interleaved).
        pixel_shuffle (`int`): side of the space-to-depth block applied before the projector (2 → 4x fewer tokens).
        projector_hidden_size (`int`, *optional*): hidden width of the MLP projector (default: the LM's width).
        tile_size (`int`), max_tiles (`int`), use_thumbnail (`bool`): the tiling the processor uses.
        vision_chunk_size (`int`): most tiles one encoder call sees (0: all tiles in one call).
        reference_comparison (`bool`): give each visual token of an image its distance to the nearest patch
            feature of the earlier images of the same prompt (the references of an ICL episode), turned into an
            anomaly map and a learned embedding added to the token (see `KensaVLReferenceComparison`).
        reference_encoders (`list[str]`, *optional*): the encoders compared (default: all).
        reference_views (`list[str]`, *optional*): each reference tile also enters the bank flipped or turned, one
            copy per view (`REFERENCE_VIEWS`): PatchCore's memory bank augmented, so a few photos cover more of the
            orientations a good texture or part shows. Costs the compared encoders once more per view on the
            references (not on the query) and a bank that many times larger.
        reference_coreset (`float`): the share of each reference image's cells (all views) kept in the bank, a
            greedy k-center coreset (PatchCore's): every left-out cell lies near a kept one, and every search against
            the bank costs that share of the full one. 1 keeps every cell.
        exact_search_cells (`int`), search_probes (`int`): a bank of up to `exact_search_cells` cells is searched
            exactly; a larger one approximately, each query cell in the `search_probes` nearest of its lists of about
            256 cells (`inverted_file_similarity`; 0 probes: always exact).
        anomaly_loss_weight (`float`): weight of the anomaly-map loss when `anomaly_labels` are given.
        summary_stop_token_ids (`list[int]`): a compared image's summary embedding is added to its `</img>` token and
            the text after it, up to the next of these tokens (the builders set `<img>` and `<|im_start|>`: the
            next image or the next chat turn); empty: to the `</img>` token alone.
        verdict_token_ids (`list[int]`): the first tokens of "good" and "defective". With `reference_comparison`,
            each compared image's verdict logit (`KensaVLReferenceComparison.verdict`) sets the odds between these two
            at the answer's start (`answer_prompt_ids`), their joint probability unchanged (`set_verdict_odds`).
        answer_prompt_ids (`list[int]`): the chat template's generation prompt (`<|im_start|>assistant\n`) as token
            ids: the position of its last token predicts the answer's first. Empty: no verdict odds are set.
        good_label_ids, defective_label_ids (`list[int]`): the tokens that open an example's label right after its
            image ("good", " good" / "defective", " defective"); name_marks (`list[int]`): the tokens around a
            defective example's name (":" and " at"). With `reference_comparison`, a defective example stays out
            of the good bank and its name can be copied into the answer (`demos_kensa_vl.py`). Empty: every earlier
            image is a reference and nothing is copied.
        grade_word_ids (`list[list[int]]`): the token ids of "grade" and " grade", which open a graded example's label
            (`grade: <name>`) and a grading answer; grade_marks (`list[int]`): the tokens that end a grade's name
            ("," and a line break). With `reference_comparison`, a query after graded examples is graded by its
            whole-image statistics and its answer copies the grade's label (`grading_kensa_vl.py`). Empty: no
            grading.
        box_token_ids (`list[int]`), num_loc_bins (`int`): `<box>` and `</box>`, and the location bins per axis
            (`<loc_0>` is `loc_token_start_id`). With `reference_comparison`, a box written after an answer's
            `<box>` copies the comparison's box of the query (`locate_box`), as the Inspector draws it. Empty: no box
            is copied.
        position_token_ids (`list[list[int]]`): the token ids of " the <position> <box>" for the nine position
            words, in the 3x3 order of `POSITIONS` (top left ... bottom right): copied after a name's " at" from the
            box's centre, then the box. Empty: the language model writes them.
        image_token_id, ... : ids of the reserved special tokens (filled in by the builders).
    """

    model_type = "kensa_vl"
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_encoders: list[dict] | None = None,
        fusion: str = "concat",
        pixel_shuffle: int = 2,
        projector_hidden_size: int | None = None,
        tile_size: int = 448,
        max_tiles: int = 12,
        use_thumbnail: bool = True,
        vision_chunk_size: int = 0,
        reference_comparison: bool = False,
        reference_encoders: list[str] | None = None,
        reference_views: list[str] | None = None,
        reference_coreset: float = 1.0,
        exact_search_cells: int = 65536,
        search_probes: int = 8,
        anomaly_loss_weight: float = 1.0,
        summary_stop_token_ids: list[int] | None = None,
        verdict_token_ids: list[int] | None = None,
        answer_prompt_ids: list[int] | None = None,
        good_label_ids: list[int] | None = None,
        defective_label_ids: list[int] | None = None,
        name_marks: list[int] | None = None,
        grade_word_ids: list[list[int]] | None = None,
        grade_marks: list[int] | None = None,
        box_token_ids: list[int] | None = None,
        num_loc_bins: int = 256,
        position_token_ids: list[list[int]] | None = None,
        image_token_id: int | None = None,
        loc_token_start_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = CONFIG_MAPPING[text_config.pop("model_type", "llama")](**text_config)
        elif text_config is None:
            text_config = CONFIG_MAPPING["llama"]()
        # 4.x reads tie_word_embeddings from the text config, 5.x from the top-level config: set both.
        text_config.tie_word_embeddings = tie_word_embeddings
        self.text_config = text_config

        encoders = []
        for encoder in vision_encoders or []:
            encoder = copy.deepcopy(dict(encoder))
            encoder["config"] = _config_dict(encoder["config"])
            for key, value in ENCODER_DEFAULTS.get(encoder["config"]["model_type"], FALLBACK_ENCODER_DEFAULTS).items():
                encoder.setdefault(key, list(value))
            encoder.setdefault("layer_merge", "weighted")
            encoder.setdefault("scales", [1])
            if encoder["config"]["model_type"] == DCT_MODEL_TYPE:
                dct = encoder["config"]
                dct.setdefault("hidden_size", dct["luma_coefficients"] + 2 * dct["chroma_coefficients"])
            if encoder["config"]["model_type"] == BANDPASS_MODEL_TYPE:
                bands = encoder["config"]
                channels = bandpass_channels(bands.get("planes", BANDPASS_PLANES[:2]))
                bands.setdefault("hidden_size", channels * len(bands["sigmas"]) + 1)
            encoders.append(encoder)
        self.vision_encoders = encoders
        self.fusion = fusion
        self.pixel_shuffle = pixel_shuffle
        self.projector_hidden_size = projector_hidden_size
        self.tile_size = tile_size
        self.max_tiles = max_tiles
        self.use_thumbnail = use_thumbnail
        self.vision_chunk_size = vision_chunk_size
        self.reference_comparison = reference_comparison
        self.reference_encoders = list(reference_encoders) if reference_encoders else None
        self.reference_views = list(reference_views or [])
        self.reference_coreset = float(reference_coreset)
        self.exact_search_cells = exact_search_cells
        self.search_probes = search_probes
        self.anomaly_loss_weight = anomaly_loss_weight
        self.summary_stop_token_ids = list(summary_stop_token_ids or [])
        self.verdict_token_ids = list(verdict_token_ids or [])
        self.answer_prompt_ids = list(answer_prompt_ids or [])
        self.good_label_ids = list(good_label_ids or [])
        self.defective_label_ids = list(defective_label_ids or [])
        self.name_marks = list(name_marks or [])
        self.grade_word_ids = [list(ids) for ids in grade_word_ids or []]
        self.grade_marks = list(grade_marks or [])
        self.box_token_ids = list(box_token_ids or [])
        self.num_loc_bins = num_loc_bins
        self.position_token_ids = [list(ids) for ids in position_token_ids or []]
        self.image_token_id = image_token_id
        self.loc_token_start_id = loc_token_start_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if encoders:
            self.validate_vision()

    def validate_vision(self) -> None:
        """Raise `ValueError` when the encoders cannot share one patch grid or the options are unknown."""
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}.")
        names = [encoder["name"] for encoder in self.vision_encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"Vision encoder names must be unique, got {names}.")
        for encoder in self.vision_encoders:
            if encoder["layer_merge"] not in LAYER_MERGES:
                raise ValueError(
                    f"Encoder {encoder['name']!r}: layer_merge must be one of {LAYER_MERGES}, "
                    f"got {encoder['layer_merge']!r}."
                )
            if not encoder["feature_layers"]:
                raise ValueError(f"Encoder {encoder['name']!r}: feature_layers is empty.")
            window = encoder.get("own_window")
            if window is not None and not 0 < window < 1:
                raise ValueError(
                    f"Encoder {encoder['name']!r}: own_window is a share of the image's longer side, in (0, 1) or "
                    f"None; got {window}."
                )
            scales = encoder["scales"]
            if (
                scales[0] != 1
                or any(not isinstance(x, int) or x < 1 for x in scales)
                or len(set(scales)) != len(scales)
            ):
                raise ValueError(
                    f"Encoder {encoder['name']!r}: scales must be distinct whole numbers starting with 1 "
                    f"(e.g. [1, 2]), got {scales}."
                )
        grids = {encoder["name"]: encoder_patch_grid(encoder, self.tile_size) for encoder in self.vision_encoders}
        common = self.grid_size
        unknown = sorted(set(self.reference_encoders or []) - set(names))
        if unknown:
            raise ValueError(f"reference_encoders {unknown} are not among the vision encoders {names}.")
        masking = [encoder["name"] for encoder in self.vision_encoders if encoder.get("masks_background")]
        if len(masking) > 1 or set(masking) - set(self.reference_encoder_names()):
            raise ValueError(
                f"masks_background: at most one encoder, and one the comparison runs on "
                f"({self.reference_encoder_names()}); got {masking}."
            )
        check_views(self.reference_views)
        check_coreset(self.reference_coreset)
        if common % self.pixel_shuffle:
            raise ValueError(
                f"The common patch grid {common} is not divisible by pixel_shuffle {self.pixel_shuffle} "
                f"(tile_size {self.tile_size}, grids {grids})."
            )

    def reference_encoder_names(self) -> list[str]:
        return self.reference_encoders or [encoder["name"] for encoder in self.vision_encoders]

    def locating_encoder_names(self) -> list[str]:
        """The compared encoders whose cells place the box and the heatmap: all but those whose entry says
        `locate: false` (the first compared encoder when every entry does)."""
        entries = {encoder["name"]: encoder for encoder in self.vision_encoders}
        names = self.reference_encoder_names()
        return [n for n in names if entries[n].get("locate", True)] or names[:1]

    @property
    def grid_size(self) -> int:
        """Side of the common patch grid all encoders are pooled to (the smallest encoder grid)."""
        return min(encoder_patch_grid(encoder, self.tile_size) for encoder in self.vision_encoders)

    @property
    def token_side(self) -> int:
        """Side of a tile's grid of visual token positions: the common patch grid after the pixel shuffle."""
        return self.grid_size // self.pixel_shuffle

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens one tile becomes in the language model (the processor repeats `<image>` this often): one
        per token position, or one per encoder and position when interleaving."""
        streams = len(self.vision_encoders) if self.fusion == "interleave" else 1
        return streams * self.token_side**2

    def encoder_hidden_sizes(self) -> dict[str, int]:
        """Channels each encoder contributes after its layer merge."""
        sizes = {}
        for encoder in self.vision_encoders:
            hidden = encoder_width(encoder)
            merged = hidden * len(encoder["feature_layers"]) if encoder["layer_merge"] == "concat" else hidden
            sizes[encoder["name"]] = merged * len(encoder.get("scales", [1]))
        return sizes
