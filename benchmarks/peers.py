"""KensaVL and its peers from transformers, built at one size: the same vision-encoder size (every tower) and the
same language-model size, random weights, each fed by its own processor (`benchmarks/tokens.py`). Used by
`episode.py` and `scaling.py`.

KensaVL: its default layout (two towers, SigLIP-like + DINOv2-like with two taps, 448 px tiles, <= 12 tiles +
thumbnail, 2x2 pixel shuffle); LLaVA-NeXT: one CLIP-like tower at 336 px, anyres <= 672^2; Idefics3: one
SigLIP-like tower at 364 px tiles, 2x2 pixel shuffle; InternVL: one InternViT-like tower at 448 px, <= 12 tiles,
2x2 pixel shuffle. All language models are the same Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import transformers as T

from benchmarks.tokens import PEER_TOKENS, peers
from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
from kensa_vl.processing.processing_kensa_vl import IMAGE_TOKEN
from kensa_vl.train.build import dct_encoder, make_processor, set_token_ids, train_tokenizer

# small enough for a 2-core CPU, shaped like the real ones (heads of 64, MLP 4x)
VISION = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 512}
TEXT = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
NAMES = ("KensaVL", "LLaVA-NeXT", "Idefics3", "InternVL")


@dataclass
class Built:
    name: str
    model: object
    processor: object
    placeholder: str  # what marks an image in the text

    def inputs(self, images: list, max_tiles: list[int] | None = None) -> dict:
        """One prompt: "Example i: <image>" per support, then "Query: <image>" (the last image)."""
        text = "".join(f"Example {i}: {self.placeholder}\n" for i in range(len(images) - 1))
        text += f"Query: {self.placeholder} Is it defective?"
        if self.name == "Idefics3":
            batch = self.processor(text=[text], images=[images], return_tensors="pt")
        elif self.name == "KensaVL":
            batch = self.processor(text=text, images=images, max_tiles=max_tiles, return_tensors="pt")
        else:
            batch = self.processor(text=[text], images=images, return_tensors="pt")
        return dict(batch)


def _text(tokenizer) -> dict:
    return {"model_type": "llama", "vocab_size": len(tokenizer), "max_position_embeddings": 32768, **TEXT}


def build(name: str, tokenizer=None, dct: bool = False, vision: dict = VISION, text: dict | None = None) -> Built:
    """One model and processor by name (`NAMES`), SDPA attention everywhere (transformers' default). `dct`: KensaVL
    with the reference comparison on the DCT encoder at 7 px blocks (the main job's layout). `vision`: every tower's
    sizes; `text`: the language model's config (default: the small Llama above)."""
    tokenizer = tokenizer or tokenizer_with_peer_tokens()
    ids = tokenizer.convert_tokens_to_ids
    processors = {key.split(" ")[0]: value for key, value in peers(tokenizer).items()}
    patch = {"patch_size": 14, **vision}
    text = text or _text(tokenizer)
    if name == "KensaVL":
        encoders = [
            {"name": "siglip", "config": {"model_type": "siglip_vision_model", "image_size": 448, **patch}},
            {
                "name": "dinov2",
                "config": {"model_type": "dinov2", "image_size": 448, "mlp_ratio": 4, **_vit(patch)},
                "feature_layers": [-2, -1],
            },
        ]
        comparison = {}
        if dct:
            encoders.append(dct_encoder())
            comparison = {"reference_comparison": True, "reference_encoders": ["dct"]}
        config = KensaVLConfig(text_config=text, vision_encoders=encoders, tile_size=448, **comparison)
        set_token_ids(config, tokenizer)
        model = KensaVLForConditionalGeneration(config)
        return Built(name, model, make_processor(tokenizer, config), IMAGE_TOKEN)
    processor, placeholder, _ = processors["InternVL" if name == "InternVL" else name]
    if name == "LLaVA-NeXT":
        config = T.LlavaNextConfig(
            vision_config=T.CLIPVisionConfig(image_size=336, **patch),
            text_config=text,
            image_token_index=ids(IMAGE_TOKEN),
            image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = T.LlavaNextForConditionalGeneration(config)
    elif name == "Idefics3":
        config = T.Idefics3Config(
            vision_config=T.Idefics3VisionConfig(image_size=364, **patch),
            text_config=text,
            image_token_id=ids(IMAGE_TOKEN),
            scale_factor=2,
        )
        model = T.Idefics3ForConditionalGeneration(config)
    elif name == "InternVL":
        config = T.InternVLConfig(
            vision_config=T.InternVLVisionConfig(image_size=[448, 448], **{**patch, "patch_size": [14, 14]}),
            text_config=text,
            image_token_id=ids("<IMG_CONTEXT>"),
            downsample_ratio=0.5,
        )
        model = T.InternVLForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {NAMES}")
    return Built(name, model, processor, placeholder)


def _vit(patch: dict) -> dict:
    return {k: v for k, v in patch.items() if k != "intermediate_size"}  # DINOv2 sizes its MLP by mlp_ratio


def tokenizer_with_peer_tokens():
    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": PEER_TOKENS}, False)
    return tokenizer
