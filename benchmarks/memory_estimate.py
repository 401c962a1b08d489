"""Per-GPU memory of model states for the real-size recipes, from exact parameter counts (built on the meta
device, offline) and the ZeRO partitioning arithmetic; activations are not included (they depend on the tokens
per batch; see the README).

    python -m benchmarks.memory_estimate [--gpus 8]

Bytes per parameter, bf16 mixed precision with AdamW: a trainable parameter holds bf16 weight + bf16 gradient +
fp32 master weight + two fp32 Adam moments = 2 + 2 + 12 bytes; a frozen one its bf16 weight, 2 bytes. ZeRO-2 splits
gradients and optimizer states across GPUs, ZeRO-3 the weights too; LoRA trains only its adapters and the projector.
"""

from __future__ import annotations

import argparse

import torch

from kensa_vl.modeling.configuration_kensa_vl import REFERENCE_VIEWS, KensaVLConfig
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration
from kensa_vl.train.build import with_compared, with_masking

# image_size: the 448 px tile, as `kensa-vl assemble` stores the towers (position embeddings resized once,
# `at_tile_size`; the checkpoints' own are 384 and 518 px)
SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
          "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 448}  # fmt: skip
DINOV2 = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
          "patch_size": 14, "image_size": 448}  # fmt: skip
QWEN = {
    "1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie": True},
    "7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie": False},
}  # fmt: skip
GIB = 1024**3


def build(size: str) -> KensaVLForConditionalGeneration:
    with torch.device("meta"):
        return KensaVLForConditionalGeneration(real_config(size))


def comparison_settings(compare: list[str]) -> dict:
    """The config settings of a reference comparison on the encoders `compare`, with every reference view; none: {}."""
    views = list(REFERENCE_VIEWS)
    return (
        {"reference_comparison": True, "reference_encoders": list(compare), "reference_views": views}
        if compare
        else {}
    )


def language_model(size: str) -> dict:
    """The Qwen2.5 language model's config at `size` ("1.5b", "7b"), its output layer tied or not."""
    return {k: v for k, v in QWEN[size].items() if k != "tie"} | {"tie_word_embeddings": QWEN[size]["tie"]}


def real_config(size: str, compare: list[str] = (), mask_background: str | None = None) -> KensaVLConfig:
    """The real-size layout: SigLIP-so400m/14 + DINOv2-L/14 (two taps each) at 448 px tiles, a Qwen2.5 LM.
    `compare`: the encoders the reference comparison runs on, as `kensa-vl assemble --compare` takes them (a tower's
    name; "dct" and "bandpass" add the weight-free encoders), with every reference view; none: no comparison.
    `mask_background`: the compared encoder that masks the background (`kensa-vl assemble --mask-background`)."""
    text = language_model(size)
    tie = text.pop("tie_word_embeddings")  # set on the KensaVL config itself
    encoders = [
        {"name": "siglip", "config": SIGLIP, "feature_layers": [-2, -1]},
        {"name": "dinov2", "config": DINOV2, "feature_layers": [-4, -1]},
    ]
    encoders = with_masking(with_compared(encoders, compare, 448), list(compare), mask_background)
    return KensaVLConfig(
        text_config=text,
        vision_encoders=encoders,
        tile_size=448,
        max_tiles=12,
        tie_word_embeddings=tie,
        **comparison_settings(compare),
    )


def counts(model, size: str) -> dict[str, int]:
    def n(prefix: str) -> int:
        return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix))

    text = QWEN[size]
    lora_r, layers, h = 16, text["num_hidden_layers"], text["hidden_size"]
    kv = h // text["num_attention_heads"] * text["num_key_value_heads"]
    # LoRA r=16 on q, k, v, o, gate, up, down: r * (in + out) per module
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, text["intermediate_size"]), (h, text["intermediate_size"]),
              (text["intermediate_size"], h)]  # fmt: skip
    return {
        "all": sum(p.numel() for p in model.parameters()),
        "towers": n("model.vision_towers"),
        "projector": n("model.multi_modal_projector") + n("model.layer_merges"),
        "lm": n("model.language_model") + (0 if text["tie"] else n("lm_head")),
        "lora": layers * sum(lora_r * (a + b) for a, b in shapes),
    }


def per_gpu(c: dict, stage: str, zero: int, gpus: int) -> float:
    trainable = {
        "align": c["projector"],
        "multitask": c["projector"] + c["lm"],
        "finetune": c["projector"] + c["lora"],
    }[stage]
    weights = 2 * (c["all"] + (c["lora"] if stage == "finetune" else 0))
    grads, optimizer = 2 * trainable, 12 * trainable
    if zero >= 2:
        grads, optimizer = grads / gpus, optimizer / gpus
    if zero >= 3:
        weights = weights / gpus
    return (weights + grads + optimizer) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    gpus = parser.parse_args().gpus
    print(f"| LM | stage | trainable params | model states per GPU, {gpus} GPUs: ZeRO-2 | ZeRO-3 |")
    print("|---|---|---|---|---|")
    for size in QWEN:
        c = counts(build(size), size)
        for stage in ("align", "multitask", "finetune"):
            trainable = {"align": c["projector"], "multitask": c["projector"] + c["lm"],
                         "finetune": c["projector"] + c["lora"]}[stage]  # fmt: skip
            print(
                f"| Qwen2.5-{size.upper()} ({c['all'] / 1e9:.2f} B in all) | {stage} | {trainable / 1e6:,.0f} M | "
                f"{per_gpu(c, stage, 2, gpus):.1f} GiB | {per_gpu(c, stage, 3, gpus):.1f} GiB |"
            )


if __name__ == "__main__":
    main()
