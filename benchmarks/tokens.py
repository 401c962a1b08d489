"""Visual tokens per image for KensaVL's default and its peers, each counted by running the peer's own processor.

    python benchmarks/tokens.py            # prints a markdown table (for BENCHMARKS.md)

Peers use their real released preprocessing settings and transformers' PIL image processors (offline, no
torchvision). InternVL and Qwen2-VL processors are built without their video processor (which needs torchvision);
their image path is the library's own code. Counts are the image-placeholder tokens in `input_ids` (plus, for
KensaVL, its tile tags are reported separately).
"""

from __future__ import annotations

import re

import numpy as np
import transformers as T
from PIL import Image

from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig
from kensa_vl.processing.processing_kensa_vl import IMAGE_TOKEN
from kensa_vl.train.build import make_processor, set_token_ids, train_tokenizer

SIZES = [(448, 448), (1024, 768), (1344, 1344), (1920, 1080), (2048, 2048)]
PEER_TOKENS = [
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<IMG_CONTEXT>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<video>",
]


def default_config(tokenizer) -> KensaVLConfig:
    """KensaVL's default: SigLIP-so400m/14 + DINOv2-L/14 at 448 px tiles, up to 12 tiles + thumbnail."""
    siglip = T.SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        image_size=384,
    )
    dinov2 = T.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518
    )
    config = KensaVLConfig(
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer)},
        vision_encoders=[{"name": "siglip", "config": siglip}, {"name": "dinov2", "config": dinov2}],
    )
    set_token_ids(config, tokenizer)
    return config


def _bare(cls, **attributes):
    """A peer processor without its video processor: `__init__` insists on one, its image path does not use it."""
    processor = cls.__new__(cls)
    processor.chat_template = None
    for key, value in attributes.items():
        setattr(processor, key, value)
    return processor


def peers(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    llava_next = T.LlavaNextProcessor(
        image_processor=T.LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    idefics3 = T.Idefics3Processor(
        image_processor=T.Idefics3ImageProcessorPil(), tokenizer=tokenizer, image_seq_len=169
    )
    internvl = _bare(
        T.InternVLProcessor,
        tokenizer=tokenizer,
        image_seq_length=256,
        image_processor=T.GotOcr2ImageProcessorPil(
            crop_to_patches=True, max_patches=12, size={"height": 448, "width": 448}
        ),
        start_image_token="<img>",
        end_image_token="</img>",
        start_image_token_id=ids("<img>"),
        end_image_token_id=ids("</img>"),
        image_token="<IMG_CONTEXT>",
        image_token_id=ids("<IMG_CONTEXT>"),
        video_token="<video>",
    )
    internvl.multimodal_pattern = re.compile(r"(?P<image><IMG_CONTEXT>)|(?P<video><video>)")  # as its __init__ does
    qwen_size = {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen2-VL-7B-Instruct min_pixels / max_pixels
    qwen2vl = _bare(
        T.Qwen2VLProcessor,
        tokenizer=tokenizer,
        image_processor=T.Qwen2VLImageProcessorPil(size=qwen_size),
        image_token="<|image_pad|>",
        image_token_id=ids("<|image_pad|>"),
        video_token="<|video_pad|>",
        video_token_id=ids("<|video_pad|>"),
    )
    return {
        "LLaVA-NeXT (v1.6, 336 px, anyres ≤ 672²)": (llava_next, IMAGE_TOKEN, IMAGE_TOKEN),
        "Idefics3 (364 px tiles, 169 tokens each)": (idefics3, IMAGE_TOKEN, IMAGE_TOKEN),
        "InternVL 2.5 (448 px, ≤ 12 tiles)": (internvl, "<IMG_CONTEXT>", "<IMG_CONTEXT>"),
        "Qwen2-VL (7B-Instruct min/max pixels)": (
            qwen2vl,
            "<|vision_start|><|image_pad|><|vision_end|>",
            "<|image_pad|>",
        ),
    }


def count(processor, placeholder: str, token: str, size: tuple[int, int], tokenizer) -> int:
    image = Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8))
    ids = processor(images=[image], text=[placeholder])["input_ids"][0]
    return sum(1 for i in ids if i == tokenizer.convert_tokens_to_ids(token))


def main() -> None:
    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": PEER_TOKENS}, False)
    config = default_config(tokenizer)
    ours = make_processor(tokenizer, config)
    rows = {
        f"**KensaVL default** (448 px, ≤ 12 tiles + thumbnail, {config.tokens_per_tile}/tile)": (
            ours,
            IMAGE_TOKEN,
            IMAGE_TOKEN,
        )
    }
    rows.update(peers(tokenizer))
    header = " | ".join(f"{w}×{h}" for w, h in SIZES)
    print(f"| model (visual tokens; pixels per token) | {header} |")
    print("|---|" + "---|" * len(SIZES))
    for name, (processor, placeholder, token) in rows.items():
        cells = []
        for width, height in SIZES:
            n = count(processor, placeholder, token, (width, height), tokenizer)
            cells.append(f"{n} ({width * height / n:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    seen = count(ours, IMAGE_TOKEN, IMAGE_TOKEN, (1344, 1344), tokenizer)
    print(
        f"\nKensaVL sees a 1344² image as a 3×3 grid of native 448 px tiles + thumbnail: {seen} visual tokens "
        f"(goal ≤ 2560: {'met' if seen <= 2560 else 'NOT met'})."
    )


if __name__ == "__main__":
    main()
