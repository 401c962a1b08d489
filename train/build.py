"""Build KensaVL checkpoints: a tiny random one offline (`kensa-vl tiny`) or one assembled from pretrained parts.

    kensa-vl tiny --out outputs/tiny
    kensa-vl assemble --vision google/siglip-so400m-patch14-384 --vision facebook/dinov2-large \
        --text Qwen/Qwen2.5-1.5B-Instruct --out outputs/kensa-1.5b
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from kensa_vl.modeling.configuration_kensa_vl import ENCODER_DEFAULTS, REFERENCE_VIEWS, KensaVLConfig
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
from kensa_vl.processing.image_processing_kensa_vl import KensaVLImageProcessor
from kensa_vl.processing.processing_kensa_vl import (
    BOX_END,
    BOX_START,
    CHAT_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    IMAGE_START,
    IMAGE_TOKEN,
    NUM_LOC_BINS,
    PAD_TOKEN,
    POSITIONS,
    KensaVLProcessor,
    answer_prompt_ids,
    label_token_ids,
    location_tokens,
    special_tokens,
    verdict_token_ids,
)

logger = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_kensa_vl.KensaVLConfig",
    "AutoModel": "modeling_kensa_vl.KensaVLModel",
    "AutoModelForCausalLM": "modeling_kensa_vl.KensaVLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_kensa_vl.KensaVLForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_kensa_vl.KensaVLForConditionalGeneration",
}

# Words the tiny tokenizer is trained on: enough for prompts, answers and descriptions to be short token runs.
_CORPUS_WORDS = (
    "good defective ok ng normal anomaly yes no is this one the a an of in at on with and or it what where which "
    "image example product part surface query answer verdict defect type position box boxes describe description "
    "scratch spot stain crack hole missing material contamination discolouration cut paste scar structure shuffle "
    "tiny small medium large top bottom left right centre center upper lower middle corner edge near visible "
    "brick grass gravel wood metal fabric paper marble leather tile grid screw nut cap board pcb texture colour "
    "caption question classify class detect object photo picture shows there are no defects found clean "
    "user assistant system please look carefully compare with examples above below first second third 0 1 2 3 4 5 "
    "6 7 8 9 , . : ; ? ! ( ) - ' \" / \n"
).split(" ")

TRAINING_RECORD = "kensa_training.json"  # beside a trained model: the stages run (for the model card)


def train_tokenizer(
    vocab_size: int = 1024, num_loc_bins: int = NUM_LOC_BINS, seed: int = 0
) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    generator = torch.Generator().manual_seed(seed)
    words = _CORPUS_WORDS
    lines = []
    for _ in range(4000):  # random word sequences: every word and common pair becomes a merge
        idx = torch.randint(len(words), (12,), generator=generator).tolist()
        lines.append(" ".join(words[i] for i in idx))
    lines.append("".join(chr(c) for c in range(32, 127)))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, *special_tokens()]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        additional_special_tokens=specials[1:],
    )
    tokenizer.add_tokens(location_tokens(num_loc_bins))
    return tokenizer


def add_kensa_tokens(tokenizer, num_loc_bins: int):
    """Reserve every token KensaVL uses, up front (resizing later under ZeRO-3 + LoRA breaks)."""
    missing = [t for t in special_tokens() if t not in tokenizer.get_vocab()]
    # second argument: keep the tokenizer's own extra special tokens (its keyword was renamed in 5.x)
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, False)
    tokenizer.add_tokens([t for t in location_tokens(num_loc_bins) if t not in tokenizer.get_vocab()])
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def make_processor(tokenizer, config: KensaVLConfig) -> KensaVLProcessor:
    image_processor = KensaVLImageProcessor(
        tile_size=config.tile_size, max_tiles=config.max_tiles, use_thumbnail=config.use_thumbnail
    )
    return KensaVLProcessor(
        image_processor,
        tokenizer,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        image_seq_len=config.tokens_per_tile,
    )


def set_token_ids(config: KensaVLConfig, tokenizer) -> None:
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config.loc_token_start_id = tokenizer.convert_tokens_to_ids("<loc_0>")
    config.summary_stop_token_ids = tokenizer.convert_tokens_to_ids([IMAGE_START, CHAT_TOKENS[0]])
    config.verdict_token_ids = verdict_token_ids(tokenizer)
    config.answer_prompt_ids = answer_prompt_ids(tokenizer)
    config.box_token_ids = tokenizer.convert_tokens_to_ids([BOX_START, BOX_END])
    config.num_loc_bins = NUM_LOC_BINS
    # " the <position> <box>": the words and the box's opening, as `inspection_answer` writes them
    config.position_token_ids = [
        tokenizer(f" the {p} {BOX_START}", add_special_tokens=False).input_ids for p in POSITIONS
    ]
    for key, ids in label_token_ids(tokenizer).items():
        setattr(config, key, ids)
    if not config.name_marks:
        logger.warning("the tokenizer cannot mark examples' labels (':' or ' at' is not one token): the model will "
                       "not tell defective examples from good ones nor copy their names")  # fmt: skip
    for target in (config, config.text_config):
        target.pad_token_id = tokenizer.pad_token_id
        target.eos_token_id = tokenizer.eos_token_id
        target.bos_token_id = tokenizer.bos_token_id


def register_kensa(model: KensaVLForConditionalGeneration, processor: KensaVLProcessor) -> None:
    """Make every later `save_pretrained` (ours or a Trainer's) write the remote code and `auto_map`."""
    model.register_for_auto_class("AutoModelForImageTextToText")
    model.config.auto_map = dict(AUTO_MAP)
    processor.register_for_auto_class("AutoProcessor")
    processor.image_processor.register_for_auto_class("AutoImageProcessor")
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id


def save_kensa(model: KensaVLForConditionalGeneration, processor: KensaVLProcessor, out: str | Path) -> Path:
    """Save model + processor as a folder the Auto classes load with `trust_remote_code=True` (4.57 and 5.x)."""
    out = Path(out)
    register_kensa(model, processor)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


_VIT = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 14}
# The tiny model's encoders by name: ViTs of two families, a ResNet's stride-8 stage (twice the ViTs' grid, pooled
# onto it) and direct patches (a linear map of raw 14 px patches).
TINY_ENCODERS = {
    "siglip": {"config": {"model_type": "siglip_vision_model", "intermediate_size": 96, **_VIT}},
    "dinov2": {"config": {"model_type": "dinov2", "mlp_ratio": 2, **_VIT}, "feature_layers": [-2, -1]},
    "resnet": {
        "config": {
            "model_type": "resnet",
            "embedding_size": 16,
            "hidden_sizes": [16, 32, 48, 64],
            "depths": [1, 1, 1, 1],
            "layer_type": "basic",
        },
        "feature_layers": [2],
    },
    "patch": {"config": {"model_type": "kensa_patch", "patch_size": 14, "hidden_size": 48}},
}


def dct_encoder() -> dict:
    """The weight-free DCT encoder's entry: 7 px blocks (a grid twice as fine as 14 px ViT patches), 36 luma and 3
    chroma coefficients per channel (docs/reference-comparison.md)."""
    config = {"model_type": "kensa_dct", "patch_size": 7, "luma_coefficients": 36, "chroma_coefficients": 3}
    return {"name": "dct", "config": config}


def bandpass_encoder(tile_size: int) -> dict:
    """The weight-free band-pass encoder's entry: the DCT encoder's 7 px cells; Gaussian(s) - Gaussian(4 s) at s = 3
    and 6 px of a 112 px tile, scaled with the tile (half of a 224 px photo in the main job's 2x2 grid: the study's
    3 and 6 px of the photo), of log-luminance and the log colour ratios (`planes`: a multiplied channel moves them
    alike on dark and pale surfaces; both validation sets gained over Cb and Cr, docs/real-surfaces.md). Its excess
    over its level enters the verdict halved (its cosine distance is about a squared Euclidean one) and 0.25 lower:
    the smallest margin that keeps KensaSynth's validation balanced accuracy at the other encoders' alone, chosen on
    both validation sets (docs/real-surfaces.md). Its cells place the box beside
    the DCT cells', each against its own level (`distance_map`): a diffuse defect only they see is boxed where it is
    (`benchmarks/locate_rules.py`, docs/reference-comparison.md). Its cells are also compared with the photo's own
    cells more than a fifth of its side away (`own_window`, `own_nearest`): on the real-surface validation set
    fewer good photos are flagged, KensaSynth's is unchanged (docs/real-surfaces.md)."""
    sigmas = [3 * tile_size / 112, 6 * tile_size / 112]
    config = {"model_type": "kensa_bandpass", "patch_size": 7, "sigmas": sigmas, "planes": ["luma", "logchroma"]}
    return {"name": "bandpass", "config": config, "verdict_scale": 0.5, "verdict_margin": 0.25, "own_window": 0.2}


def contrast_encoder(tile_size: int) -> dict:
    """The weight-free contrast encoder's entry: the band-pass encoder on one plane, each cell's log local contrast
    (`planes: ["contrast"]`), at the band-pass encoder's scales: a softened or washed-out texture (a smear, a sheen)
    whose brightness and colour hardly move. Compared on its own, with its own level, rather than as a plane of the
    band-pass cells: there its spread over good photos diluted the brightness and colour changes. Its margin, 0.5,
    is the band-pass encoder's rule again: the smallest that keeps KensaSynth's validation balanced accuracy at the
    other encoders' (docs/real-surfaces.md)."""
    entry = bandpass_encoder(tile_size)
    entry["config"]["planes"] = ["contrast"]
    return {**entry, "name": "contrast", "verdict_margin": 0.5}


def tiny_config(
    tokenizer,
    tile_size: int = 224,
    max_tiles: int = 6,
    fusion: str = "concat",
    reference_comparison: bool = False,
    dct: bool = False,
    bandpass: bool = False,
    contrast: bool = False,
    reference_encoders: list[str] | None = None,
    encoders: list[str] = ("siglip", "dinov2"),
    taps: list[int] | None = None,
    s2: bool = False,
    pixel_shuffle: int = 2,
    reference_views: list[str] | None = None,
) -> KensaVLConfig:
    """Two encoders of different families (SigLIP-like, DINOv2-like with two taps), optionally the DCT encoder, and
    a tiny Llama. `encoders` picks among `TINY_ENCODERS` (the fine-detail switches of the ablation); `taps`
    replaces the ViTs' feature layers (e.g. `[0, 1, 2]`: every hidden state of the 2-layer towers); `s2` encodes
    each ViT tile at 1x and 2x (S2-Wrapper)."""
    unknown = sorted(set(encoders) - set(TINY_ENCODERS))
    if unknown or not encoders and not (dct or bandpass or contrast):
        raise ValueError(f"encoders must be a non-empty subset of {list(TINY_ENCODERS)}, got {list(encoders)}")
    entries = []
    for name in encoders:
        entry = copy.deepcopy(TINY_ENCODERS[name])
        if name in ("siglip", "dinov2"):
            entry["config"]["image_size"] = tile_size
            entry.update({"feature_layers": taps} if taps else {})
            entry.update({"scales": [1, 2]} if s2 else {})
        entries.append({"name": name, **entry})
    if dct:
        entries.append(dct_encoder())
    if bandpass:
        entries.append(bandpass_encoder(tile_size))
    if contrast:
        entries.append(contrast_encoder(tile_size))
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16384,
        "rms_norm_eps": 1e-5,
    }
    config = KensaVLConfig(
        text_config=text,
        vision_encoders=entries,
        fusion=fusion,
        pixel_shuffle=pixel_shuffle,
        tile_size=tile_size,
        max_tiles=max_tiles,
        projector_hidden_size=128,
        reference_comparison=reference_comparison,
        reference_encoders=reference_encoders,
        reference_views=reference_views,
    )
    set_token_ids(config, tokenizer)
    return config


def with_compared(encoders: list[dict], compare: list[str], tile_size: int) -> list[dict]:
    """`encoders` and the weight-free encoders that `compare` names ("dct", "bandpass", "contrast"); a ValueError
    for a name that is neither one of them nor an encoder's (`kensa-vl assemble --compare`)."""
    own = {
        "dct": dct_encoder,
        "bandpass": lambda: bandpass_encoder(tile_size),
        "contrast": lambda: contrast_encoder(tile_size),
    }
    encoders = list(encoders) + [entry() for name, entry in own.items() if name in compare]
    unknown = sorted(set(compare) - {e["name"] for e in encoders})
    if unknown:
        towers = sorted(e["name"] for e in encoders if e["name"] not in own)
        raise ValueError(
            f"--compare {unknown}: not an encoder of this model; the encoders are {towers}, dct, bandpass and contrast"
        )
    return encoders


def build_tiny(out: str | Path | None = None, seed: int = 0, **config_kwargs):
    """A tiny random KensaVL + processor, built offline in seconds. Saved to `out` when given."""
    tokenizer = train_tokenizer(seed=seed)
    config = tiny_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = KensaVLForConditionalGeneration(config).eval()
    processor = make_processor(tokenizer, config)
    if out is not None:
        save_kensa(model, processor, out)
    return model, processor


def at_tile_size(model, config, tile_size: int):
    """A pretrained ViT tower's config and weights with its position embeddings resized once to the tile's patch grid
    by the tower's own interpolation (bicubic, float32): (config, state dict). Otherwise every forward interpolates
    them again, a slow kernel on a GPU (19 ms of a 166 ms query on an H200, BENCHMARKS.md). Towers without position
    embeddings, or already at the tile's size, come back as they are."""
    embeddings = getattr(getattr(model, "vision_model", model), "embeddings", None)
    if getattr(config, "image_size", tile_size) == tile_size or not hasattr(embeddings, "interpolate_pos_encoding"):
        return config, model.state_dict()
    resized = copy.deepcopy(config)
    resized.image_size = tile_size
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in type(model)(resized).state_dict().items()}
    state = model.float().state_dict()
    changed = [k for k, v in state.items() if k in shapes and shapes[k] != v.shape]
    if len(changed) != 1:
        raise ValueError(f"expected one position-embedding weight to change size at {tile_size} px, got {changed}")
    shape = shapes[changed[0]]
    with torch.no_grad():
        positions = torch.zeros(1, shape.numel() // shape[-1], shape[-1])
        state[changed[0]] = embeddings.interpolate_pos_encoding(positions, tile_size, tile_size).reshape(shape)
    return resized, state


def _load_vision(path: str, tile_size: int):
    """A vision tower and its config from a pretrained folder or Hub id (full CLIP/SigLIP checkpoints too), its
    position embeddings at the tile's size (`at_tile_size`)."""
    config = AutoConfig.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    if getattr(config, "vision_config", None) is not None:  # CLIPModel / SiglipModel: keep the vision half
        model, config = model.vision_model, config.vision_config
    config, state = at_tile_size(model, config, tile_size)
    state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    try:
        processor = AutoImageProcessor.from_pretrained(path)
        mean, std = list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, AttributeError):
        defaults = ENCODER_DEFAULTS.get(config.model_type, {})
        mean, std = defaults.get("image_mean"), defaults.get("image_std")
        logger.warning(
            "%s: no image processor found, using %s defaults mean=%s std=%s", path, config.model_type, mean, std
        )
    return config, state, mean, std


def with_masking(encoders: list[dict], compare: list[str], name: str | None) -> list[dict]:
    """`encoders` with the entry `name` masking the background (`masks_background`); a ValueError where it is not
    compared (`kensa-vl assemble --mask-background`); unchanged for None."""
    if name is None:
        return encoders
    if name not in compare:
        raise ValueError(f"--mask-background {name!r}: not an encoder compared ({compare})")
    return [{**e, "masks_background": True} if e["name"] == name else e for e in encoders]


def assemble(
    vision: list[str],
    text: str,
    out: str | Path,
    tile_size: int = 448,
    max_tiles: int = 12,
    fusion: str = "concat",
    feature_layers: list[list[int]] | None = None,
    dtype=torch.float32,
    compare: list[str] | None = None,
    reference_views: list[str] | None = None,
    mask_background: str | None = None,
    **search,
):
    """Copy pretrained towers and LM into a fresh KensaVL (random projector), reserve tokens, save.

    `compare`: the encoders the reference comparison runs on (a tower's name, e.g. "dinov2"; "dct" and "bandpass" add
    the weight-free DCT and band-pass encoders); none: no comparison. `reference_views`: the bank's extra views
    (`REFERENCE_VIEWS`). `mask_background`: the compared encoder whose cells tell a product from its background
    (AnomalyDINO's masking with a DINOv2 tower: "dinov2"); every compared encoder's cells on the background are
    then left out where a photo shows one (`masks_background`, `product_mask`).
    `search`: the comparison's other settings (`reference_coreset`, `exact_search_cells`, `search_probes`).
    With a comparison the model gives a verdict, a heatmap and a box from the first day, before any training: the
    verdict logit starts as the query's score over the supports' own level (`KensaVLReferenceComparison`)."""
    encoders, states = [], {}
    for index, path in enumerate(vision):
        config, state, mean, std = _load_vision(path, tile_size)
        name = config.model_type.removesuffix("_vision_model")
        name = name if name not in states else f"{name}_{index}"
        entry = {"name": name, "config": {**config.to_dict(), "model_type": config.model_type}}
        entry.update({k: v for k, v in (("image_mean", mean), ("image_std", std)) if v is not None})
        if feature_layers:
            entry["feature_layers"] = feature_layers[index]
        encoders.append(entry)
        states[name] = state
    compare = list(compare or [])
    encoders = with_compared(encoders, compare, tile_size)
    encoders = with_masking(encoders, compare, mask_background)
    lm = AutoModelForCausalLM.from_pretrained(text, dtype=torch.float32)
    tokenizer = add_kensa_tokens(AutoTokenizer.from_pretrained(text), NUM_LOC_BINS)
    config = KensaVLConfig(
        text_config=lm.config.to_dict(),
        vision_encoders=encoders,
        fusion=fusion,
        tile_size=tile_size,
        max_tiles=max_tiles,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
        base_models={"vision": list(vision), "text": text},
        reference_comparison=bool(compare),
        reference_encoders=compare or None,
        reference_views=reference_views,
        **search,
    )
    model = KensaVLForConditionalGeneration(config)
    for name, state in states.items():
        missing, unexpected = model.model.vision_towers[name].load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head.")]  # SigLIP's unused pooling head
        if missing or unexpected:
            raise ValueError(
                f"Tower {name!r} does not match its checkpoint: missing {missing}, unexpected {unexpected}."
            )
    model.model.language_model.load_state_dict(lm.base_model.state_dict())
    model.lm_head.weight.data.copy_(lm.get_output_embeddings().weight.data)
    model.resize_token_embeddings(len(tokenizer))
    config.text_config.vocab_size = len(tokenizer)
    set_token_ids(config, tokenizer)
    model.to(dtype)
    return save_kensa(model, make_processor(tokenizer, config), out)


def add_parsers(subparsers) -> None:
    tiny = subparsers.add_parser("tiny")  # its --help line: cli.COMMANDS
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--tile-size", type=int, default=224)
    tiny.add_argument("--max-tiles", type=int, default=6)
    tiny.add_argument("--fusion", choices=["concat", "interleave"], default="concat")
    tiny.set_defaults(
        func=lambda a: (
            build_tiny(a.out, a.seed, tile_size=a.tile_size, max_tiles=a.max_tiles, fusion=a.fusion)
            and print(f"saved {a.out}")
        )
    )

    asm = subparsers.add_parser("assemble")  # its --help line: cli.COMMANDS
    asm.add_argument("--vision", action="append", required=True, help="vision tower id or folder (repeatable)")
    asm.add_argument("--text", required=True, help="causal LM id or folder")
    asm.add_argument("--out", required=True)
    asm.add_argument("--tile-size", type=int, default=448)
    asm.add_argument("--max-tiles", type=int, default=12)
    asm.add_argument("--fusion", choices=["concat", "interleave"], default="concat")
    asm.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    asm.add_argument(
        "--compare",
        action="append",
        help="an encoder the comparison runs on (a tower's name such as dinov2, or dct, bandpass, contrast); "
        "repeatable",
    )
    asm.add_argument(
        "--reference-views",
        type=lambda text: [v for v in text.split(",") if v],
        default=None,
        help=f"comma-separated extra views of each support in the comparison's bank: {','.join(REFERENCE_VIEWS)}",
    )
    asm.add_argument(
        "--mask-background",
        metavar="ENCODER",
        help="a compared encoder whose cells tell the product from its background (dinov2): the background of a "
        "photo that shows one is not inspected",
    )

    # the comparison's search settings; unset: the config's defaults (one place for them)
    asm.add_argument("--coreset", type=float, help="share of each support's cells the bank keeps (default 1)")
    asm.add_argument("--search-probes", type=int, help="lists a query cell searches in a large bank (default 8)")
    asm.add_argument("--exact-search-cells", type=int, help="the largest bank searched exactly (default 65,536)")

    def run(a: argparse.Namespace) -> None:
        search = {"reference_coreset": a.coreset, "search_probes": a.search_probes,
                  "exact_search_cells": a.exact_search_cells}  # fmt: skip
        out = assemble(
            a.vision,
            a.text,
            a.out,
            a.tile_size,
            a.max_tiles,
            a.fusion,
            dtype=getattr(torch, a.dtype),
            compare=a.compare,
            reference_views=a.reference_views,
            mask_background=a.mask_background,
            **{key: value for key, value in search.items() if value is not None},
        )
        print(f"saved {out}")

    asm.set_defaults(func=run)


__all__ = ["build_tiny", "assemble", "save_kensa", "make_processor"]
