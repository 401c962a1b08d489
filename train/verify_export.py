"""Load a saved KensaVL folder the way a Hub user does, in a process where `kensa_vl` cannot be imported.

python train/verify_export.py FOLDER   # prints one JSON line; run under transformers 4.57 or 5.x

`kensa-vl publish` runs it on an export before anything is pushed, and the tests run it under both versions. The
line's "problems" lists what a Hub user would hit (non-empty loading info, no tokens generated, a cache mismatch).
"""

import json
import sys

sys.modules["kensa_vl"] = None  # any import of the project from here on raises ImportError

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipeline,
)


def image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def main(path: str) -> dict:
    major = int(transformers.__version__.split(".")[0])
    result = {"version": transformers.__version__}
    result["config"] = type(AutoConfig.from_pretrained(path, trust_remote_code=True)).__name__
    result["image_processor"] = type(AutoImageProcessor.from_pretrained(path, trust_remote_code=True)).__name__
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    result["processor"] = type(processor).__name__
    auto_classes = [AutoModelForImageTextToText, AutoModelForCausalLM]
    if major < 5:
        auto_classes.append(transformers.AutoModelForVision2Seq)
    for auto in auto_classes:
        model, info = auto.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
        result[f"{auto.__name__}.loading_info"] = {k: sorted(v) for k, v in info.items() if v}
    model.eval()
    good, bad, query = image(300, 200, 1), image(480, 640, 2), image(120, 120, 3)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Reference photos of a product:\n1. "},
                {"type": "image", "image": good},
                {"type": "text", "text": " good\n2. "},
                {"type": "image", "image": bad},
                {"type": "text", "text": " defective: scratch at the center\nQuery: "},
                {"type": "image", "image": query},
                {"type": "text", "text": "\nIs this product good or defective?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    result["generated"] = cached[0, inputs["input_ids"].shape[1] :].tolist()
    result["cached_equals_uncached"] = bool(torch.equal(cached, uncached))
    config = model.config
    if getattr(config, "reference_comparison", False) and getattr(config, "name_marks", None):
        # an answer that starts "defective" about a query compared with the named example: what it writes next
        first = torch.tensor([[config.verdict_token_ids[1]]])
        named = {**inputs, "input_ids": torch.cat([inputs["input_ids"], first], 1)}
        named["attention_mask"] = torch.ones_like(named["input_ids"])
        with torch.no_grad():
            answers = [model.generate(**named, max_new_tokens=12, do_sample=False, use_cache=c) for c in (True, False)]
        result["named"] = processor.decode(answers[0][0, named["input_ids"].shape[1] :])
        result["cached_equals_uncached"] &= bool(torch.equal(*answers))
    if getattr(config, "reference_comparison", False) and getattr(config, "grade_marks", None):
        # a query after examples of two grades, pale and deep: the answer copies the label of the grade it is closer to
        def panel(level, seed):
            noise = np.random.default_rng(seed).normal(0, 8, (112, 112, 3))
            return Image.fromarray(np.clip(200 - 120 * level + noise, 0, 255).astype(np.uint8))

        shown = [("pale", panel(0.0, 4)), ("pale", panel(0.1, 5)), ("deep", panel(0.9, 6)), ("deep", panel(1.0, 7))]
        content = [{"type": "text", "text": "Graded examples of a product, graded by shade:\n"}]
        for number, (grade, picture) in enumerate(shown, 1):
            content += [{"type": "text", "text": f"{number}. "}, {"type": "image", "image": picture},
                        {"type": "text", "text": f" grade: {grade}\n"}]  # fmt: skip
        content += [{"type": "text", "text": "Query: "}, {"type": "image", "image": panel(0.95, 8)},
                    {"type": "text", "text": "\nWhich grade is this product, and why?"}]  # fmt: skip
        graded = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            greedy = {"max_new_tokens": 10, "do_sample": False}
            answers = [model.generate(**graded, **greedy, use_cache=c) for c in (True, False)]
        result["graded"] = processor.decode(answers[0][0, graded["input_ids"].shape[1] :])
        result["cached_equals_uncached"] &= bool(torch.equal(*answers))
    pipe = pipeline("image-text-to-text", model=path, trust_remote_code=True)
    greedy = {"max_new_tokens": 4, "do_sample": False}
    raw = pipe(images=[query], text="Describe <image> please", generate_kwargs=greedy)
    chat = pipe(text=messages, generate_kwargs=greedy)
    result["pipeline_raw"] = raw[0]["generated_text"]
    result["pipeline_chat"] = (
        chat[0]["generated_text"][-1]["content"]
        if isinstance(chat[0]["generated_text"], list)
        else chat[0]["generated_text"]
    )
    result["problems"] = [f"{key}: {value}" for key, value in result.items() if key.endswith("loading_info") and value]
    if not result["generated"]:
        result["problems"].append("generate returned no new tokens")
    if not result["cached_equals_uncached"]:
        result["problems"].append("generation with the KV cache differs from generation without it")
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
