"""KensaVL processor: expands each `<image>` into its tile structure and tokenises; box <-> location tokens.

Shipped to the Hub as remote code: imports only numpy, transformers and siblings.
"""

import json
import math
import os
import re

import numpy as np
import transformers
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_processing_kensa_vl import KensaVLImageProcessorKwargs, flatten_images

IMAGE_TOKEN = "<image>"  # the placeholder users write, and the token visual features replace
IMAGE_START, IMAGE_END, GLOBAL_TOKEN = "<img>", "</img>", "<global>"
BOX_START, BOX_END = "<box>", "</box>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
PAD_TOKEN = "<|endoftext|>"
MAX_GRID_SIDE = 32  # row/column tags reserved in the vocabulary
NUM_LOC_BINS = 256  # location tokens per box coordinate axis: `<loc_0>`..`<loc_255>`

DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}{{- render(message['content']) + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def tile_tags(max_side: int = MAX_GRID_SIDE) -> list[str]:
    return [f"<row_{i}>" for i in range(1, max_side + 1)] + [f"<col_{i}>" for i in range(1, max_side + 1)]


def structure_tokens() -> list[str]:
    """The tokens an image becomes (`image_token_sequence`): never learnt as text, never cut by truncation."""
    return [IMAGE_TOKEN, IMAGE_START, IMAGE_END, GLOBAL_TOKEN, *tile_tags()]


def special_tokens() -> list[str]:
    """Tokens skipped when decoding: chat markers and the image structure tokens."""
    return [*CHAT_TOKENS, *structure_tokens()]


def location_tokens(num_bins: int) -> list[str]:
    """Box tokens, kept when decoding (they are the answer): `<box>`, `</box>` and `<loc_0>`..`<loc_{n-1}>`."""
    return [BOX_START, BOX_END] + [f"<loc_{i}>" for i in range(num_bins)]


def image_token_sequence(rows: int, cols: int, num_tiles: int, image_seq_len: int) -> list[str]:
    """The tokens one image becomes; their count is the one token-count rule of the project.

    `<img>`, then per tile in row-major order `<row_r><col_c>` and `image_seq_len` `<image>` tokens, then (with a
    thumbnail) `<global>` and its `<image>` tokens, then `</img>`.
    """
    if rows > MAX_GRID_SIDE or cols > MAX_GRID_SIDE:
        raise ValueError(f"Tile grid {rows}x{cols} exceeds the {MAX_GRID_SIDE} row/column tags in the vocabulary.")
    if num_tiles not in (rows * cols, rows * cols + 1):
        raise ValueError(f"A {rows}x{cols} grid has {rows * cols} or {rows * cols + 1} tiles, got {num_tiles}.")
    tokens = [IMAGE_START]
    for row in range(1, rows + 1):
        for col in range(1, cols + 1):
            tokens += [f"<row_{row}>", f"<col_{col}>"] + [IMAGE_TOKEN] * image_seq_len
    if num_tiles > rows * cols:
        tokens += [GLOBAL_TOKEN] + [IMAGE_TOKEN] * image_seq_len
    tokens.append(IMAGE_END)
    return tokens


def boxes_to_text(boxes, width: int, height: int, num_bins: int) -> str:
    """Boxes `(x0, y0, x1, y1)` in the image's pixel coordinates as `<box><loc_x0><loc_y0><loc_x1><loc_y1></box>`.

    `x0, y0` take the bin they fall in, `x1, y1` the bin that ends at or after them, so the decoded box contains
    the original one and each edge is off by less than one bin.
    """
    parts = []
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"Box {tuple(box)} is not inside a {width}x{height} image with x0 < x1 and y0 < y1.")
        bins = [
            min(math.floor(x0 / width * num_bins + 1e-9), num_bins - 1),
            min(math.floor(y0 / height * num_bins + 1e-9), num_bins - 1),
            max(math.ceil(x1 / width * num_bins - 1e-9) - 1, 0),
            max(math.ceil(y1 / height * num_bins - 1e-9) - 1, 0),
        ]
        parts.append(BOX_START + "".join(f"<loc_{b}>" for b in bins) + BOX_END)
    return "".join(parts)


_BOX_RE = re.compile(re.escape(BOX_START) + r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>" + re.escape(BOX_END))


def text_to_boxes(text: str, width: int, height: int, num_bins: int) -> list[tuple[float, float, float, float]]:
    """Parse every well-formed box in `text` back to pixel coordinates (the covering bins' outer edges)."""
    boxes = []
    for match in _BOX_RE.finditer(text):
        a, b, c, d = (int(v) for v in match.groups())
        if max(a, b, c, d) >= num_bins or a > c or b > d:
            continue  # a malformed box in generated text is not a box
        boxes.append(
            (a * width / num_bins, b * height / num_bins, (c + 1) * width / num_bins, (d + 1) * height / num_bins)
        )
    return boxes


# The inspection answer, one fixed format: the verdict comes first so P(defective) is read off one token.
#   good
#   defective: <type> at the <position> <box>...</box>[<box>...</box>...]
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def position_word(x: float, y: float) -> str:
    """The 3x3 cell of a point given as fractions of the image's width and height."""
    return POSITIONS[3 * min(2, int(y * 3)) + min(2, int(x * 3))]


def region_position(mask: np.ndarray) -> str:
    """A defect's position word: the 3x3 cell of the centroid of its region (`mask`, `(H, W)`, True inside), the
    one rule for KensaSynth's masks and a user's boxes."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise ValueError(f"The defect region is empty: a {mask.shape[1]}x{mask.shape[0]} mask with no pixel set.")
    return position_word(xs.mean() / mask.shape[1], ys.mean() / mask.shape[0])


_ANSWER_RE = re.compile(  # the type is any text up to " at" (a user's own name: "キズ", "zorbik", "dark spot")
    r"^\s*(?P<verdict>good|defective)\b(?::\s*(?P<type>[^\n<]+?)\s+at\b(?:\s+the\s+(?P<position>"
    + "|".join(sorted(POSITIONS, key=len, reverse=True))
    + r")\b)?)?"
)


VERDICT_WORDS = ("good", "defective")  # an inspection answer's first word
ANSWER_PROMPT = CHAT_TOKENS[0] + "assistant\n"  # the chat template's generation prompt: the answer follows it


def verdict_token_ids(tokenizer) -> list[int]:
    """First token of "good" and of "defective": the verdict is read off these two at the answer's start."""
    good, defective = (tokenizer(word, add_special_tokens=False).input_ids[0] for word in VERDICT_WORDS)
    if good == defective:
        raise ValueError("the tokenizer starts 'good' and 'defective' with the same token; P(defective) is undefined")
    return [good, defective]


def label_token_ids(tokenizer) -> dict[str, list[int]]:
    """The token ids that mark an example's label after its image (`demos_kensa_vl.read_label`): the first tokens of
    "good" and "defective" with and without a leading space, the tokens around a defect's name (":" and " at"), the
    tokens of "grade" and " grade" and those that end a grade's name ("," and a line break). Empty lists where the
    tokenizer cannot mark them (":" or " at" not one token, or " good" and " defective" starting alike; "," or a line
    break not one token): the model then reads no labels (no grades) and copies no names."""
    first = {word: sorted({tokenizer(w, add_special_tokens=False).input_ids[0] for w in (word, " " + word)})
             for word in VERDICT_WORDS}  # fmt: skip
    marks = [tokenizer(mark, add_special_tokens=False).input_ids for mark in (":", " at")]
    ends = [tokenizer(mark, add_special_tokens=False).input_ids for mark in (",", "\n")]
    words = [tokenizer(w, add_special_tokens=False).input_ids for w in (GRADE_WORD, " " + GRADE_WORD)]
    grades = {"grade_word_ids": words, "grade_marks": sum(ends, [])}
    if any(len(m) != 1 for m in marks + ends):
        grades = {"grade_word_ids": [], "grade_marks": []}
    if any(len(m) != 1 for m in marks) or set(first["good"]) & set(first["defective"]):
        return {"good_label_ids": [], "defective_label_ids": [], "name_marks": [], **grades}
    return {"good_label_ids": first["good"], "defective_label_ids": first["defective"], "name_marks": sum(marks, []),
            **grades}  # fmt: skip


def answer_prompt_ids(tokenizer) -> list[int]:
    """The token ids of the generation prompt (`ANSWER_PROMPT`): its last token predicts the answer's first."""
    return tokenizer(ANSWER_PROMPT, add_special_tokens=False).input_ids


UNNAMED_DEFECT = "defect"  # a defect no example names: no defective example in the support, or one without words


def inspection_answer(defect_type: str | None, position: str | None, boxes, width: int, height: int, num_bins: int):
    """The target answer: `"good"` when `defect_type` is None, else `"defective: <type> at the <position> <boxes>"`."""
    if defect_type is None:
        return "good"
    if position not in POSITIONS:
        raise ValueError(f"Position must be one of {POSITIONS}, got {position!r}.")
    return f"defective: {defect_type} at the {position} " + boxes_to_text(boxes, width, height, num_bins)


def parse_inspection_answer(text: str, width: int, height: int, num_bins: int) -> dict:
    """Read an answer back: verdict ("good", "defective" or None when the text does not start with one), defect
    type, position and boxes in pixels."""
    match = _ANSWER_RE.match(text)
    return {
        "verdict": match["verdict"] if match else None,
        "defect_type": match["type"] if match else None,
        "position": match["position"] if match else None,
        "boxes": text_to_boxes(text, width, height, num_bins),
    }


GRADE_WORD = "grade"  # a grading answer's and a graded example's first word: "grade: <name>[, <why>]"
_GRADE_RE = re.compile(r"^\s*grade:\s*(?P<grade>[^,\n<]+?)\s*(?:,\s*(?P<why>[^\n]*?)\s*)?$", re.MULTILINE)


def grading_answer(grade: str, why: str | None = None) -> str:
    """A graded example's label or a grading answer: `"grade: <name>"`, then `", <why>"` when there is one. A grade
    name holds no ',', ':' or line break (they end it)."""
    if not grade.strip() or any(c in grade for c in ",:\n"):
        raise ValueError(f"a grade name must be non-empty text without ',', ':' or a line break; got {grade!r}")
    return f"{GRADE_WORD}: {grade.strip()}" + (f", {why}" if why else "")


def parse_grading_answer(text: str) -> dict:
    """Read a grading answer back: `grade` (None when the first line is not `grade: <name>...`) and `why`."""
    match = _GRADE_RE.match(text.split("\n", 1)[0])
    return {"grade": match["grade"] if match else None, "why": match["why"] if match else None}


class KensaVLProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: KensaVLImageProcessorKwargs
    _defaults = {"text_kwargs": {"padding": False}}


class KensaVLProcessor(ProcessorMixin):
    r"""
    Wraps a [`KensaVLImageProcessor`] and a fast tokenizer.

    Each `<image>` in the text becomes `<img>`, per tile `<row_r><col_c>` + `image_seq_len` image tokens, the
    thumbnail as `<global>` + image tokens, and `</img>`. Text may be a string or a batch; images a flat list (in
    placeholder order across the batch) or one list per sample; samples may have no image.

    Args:
        image_seq_len (`int`): image tokens per tile (`KensaVLConfig.tokens_per_tile`).
        num_loc_bins (`int`): location bins per axis for boxes.
    """

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x reads these; 5.x infers them and warns if set
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"
    valid_kwargs = ["chat_template", "image_seq_len", "num_loc_bins"]
    valid_processor_kwargs = KensaVLProcessorKwargs
    model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_grid"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_len: int = 256,
        num_loc_bins: int = NUM_LOC_BINS,
        **kwargs,
    ):
        # 5.x raises on unknown kwargs in ProcessorMixin.__init__: consume ours first.
        self.image_seq_len = image_seq_len
        self.num_loc_bins = num_loc_bins
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._structure_ids = set(tokenizer.convert_tokens_to_ids(structure_tokens()))

    def _pair_images(self, texts: list[str], images) -> list:
        counts = [text.count(IMAGE_TOKEN) for text in texts]
        nested = isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"Got {len(images)} image lists for {len(texts)} texts.")
            per_sample = [len(flatten_images(item)) for item in images]
            if per_sample != counts:
                raise ValueError(
                    f"Each text needs one image per {IMAGE_TOKEN}: placeholders {counts}, images {per_sample}."
                )
        flat = flatten_images(images)
        if len(flat) != sum(counts):
            raise ValueError(
                f"The text has {sum(counts)} {IMAGE_TOKEN} placeholders (per sample {counts}) but {len(flat)} images "
                "were given."
            )
        return flat

    def _expand(self, texts: list[str], image_grid) -> tuple[list[str], list[list[dict]]]:
        expanded, offsets, index = [], [], 0
        for text in texts:
            pieces = text.split(IMAGE_TOKEN)
            out, sample_offsets, cursor = pieces[0], [], len(pieces[0])
            for piece in pieces[1:]:
                rows, cols, tiles = (int(v) for v in image_grid[index])
                replacement = "".join(image_token_sequence(rows, cols, tiles, self.image_seq_len))
                sample_offsets.append(
                    {
                        "type": "image",
                        "span": (cursor, cursor + len(IMAGE_TOKEN)),
                        "new_span": (len(out), len(out) + len(replacement)),
                        "text": IMAGE_TOKEN,
                        "replacement": replacement,
                    }
                )
                out += replacement + piece
                cursor += len(IMAGE_TOKEN) + len(piece)
                index += 1
            expanded.append(out)
            offsets.append(sample_offsets)
        return expanded, offsets

    def _check_truncation(self, texts: list[str], max_length: int, text_kwargs: dict) -> None:
        encoded = self.tokenizer(texts, add_special_tokens=text_kwargs.get("add_special_tokens", True))["input_ids"]
        left = self.tokenizer.truncation_side == "left"
        for sample, ids in enumerate(encoded):
            if len(ids) <= max_length:
                continue
            dropped = ids[: len(ids) - max_length] if left else ids[max_length:]
            hits = sum(1 for token in dropped if token in self._structure_ids)
            if hits:
                raise ValueError(
                    f"Sample {sample} needs {len(ids)} tokens; truncating to max_length={max_length} would cut "
                    f"{hits} image tokens. Raise max_length to at least {len(ids)} or give the images fewer tiles."
                )

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """
        Returns a `BatchFeature` with `input_ids`, `attention_mask`, and for images `pixel_values` and
        `image_grid` (see [`KensaVLImageProcessor.preprocess`]). With `return_text_replacement_offsets=True` also the
        per-sample placeholder spans TRL's assistant-only loss needs. `max_tiles` may be one int or one per image.

        Raises:
            ValueError: placeholder/image count mismatch, bad images, or truncation that would cut an image.
        """
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
        for unused in ("sanitize_control_tokens", "videos", "audio", "return_mm_token_type_ids", "truncation_side"):
            kwargs.pop(unused, None)
        # the library's routing: image options to the image processor, text options to the tokenizer
        merged = self._merge_kwargs(KensaVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        image_kwargs, text_kwargs = merged["images_kwargs"], merged["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None) or image_kwargs.pop("return_tensors", None)
        image_kwargs.pop("return_tensors", None)
        text_kwargs.pop("return_token_type_ids", None)
        if text is None and images is None:
            raise ValueError("KensaVLProcessor needs `text`, `images` or both.")

        data = {}
        texts = [text] if isinstance(text, str) else list(text) if text is not None else None
        if images is not None:
            flat = self._pair_images(texts, images) if texts is not None else flatten_images(images)
            data.update(self.image_processor(flat, **image_kwargs))
        elif texts is not None and any(IMAGE_TOKEN in t for t in texts):
            raise ValueError(
                f"The text has {sum(t.count(IMAGE_TOKEN) for t in texts)} {IMAGE_TOKEN} placeholders "
                "but no images were given."
            )
        if texts is None:
            return BatchFeature(data, tensor_type=return_tensors)

        texts, offsets = self._expand(texts, data.get("image_grid", []))
        if text_kwargs.get("truncation") and text_kwargs.get("max_length"):
            self._check_truncation(texts, text_kwargs["max_length"], text_kwargs)
        encoded = self.tokenizer(texts, return_token_type_ids=False, **text_kwargs)
        data.update(encoded)
        batch = BatchFeature(data, tensor_type=return_tensors)
        if return_offsets:  # per-sample list of dicts; never tensor-converted
            batch["text_replacement_offsets"] = offsets
        return batch

    def _adjust_assistant_masks_indices(self, processed_dict: dict, generation_indices: list[list[int]]) -> dict:
        # transformers 5.x's own walks every token's offsets in Python, one tensor element at a time: a third of a
        # training step's data time on episodes. The same rule over whole arrays: a token is in the assistant mask
        # when it overlaps a generation span, the span shifted past the image placeholders expanded before it.
        offsets = processed_dict.pop("offset_mapping")
        replacements = processed_dict.pop("text_replacement_offsets", None) or [[]] * len(offsets)
        masks = []
        for sample, spans in enumerate(generation_indices):
            ends = np.array([r["span"][1] for r in replacements[sample]], dtype=np.int64)
            gained = np.array([0] + [r["new_span"][1] - r["span"][1] for r in replacements[sample]], dtype=np.int64)
            starts, stops = np.asarray(offsets[sample]).reshape(-1, 2).T
            mask = np.zeros(len(starts), dtype=bool)
            for first, last in spans:
                first, last = (int(c + gained[np.searchsorted(ends, c, side="right")]) for c in (first, last))
                mask |= (starts < last) & (stops > first)
            masks.append(mask.astype(int).tolist())
        processed_dict["assistant_masks"] = masks
        return processed_dict

    def boxes_to_text(self, boxes, width: int, height: int) -> str:
        return boxes_to_text(boxes, width, height, self.num_loc_bins)

    def text_to_boxes(self, text: str, width: int, height: int):
        return text_to_boxes(text, width, height, self.num_loc_bins)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids to strings (location tokens are kept: they are not special)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save so that transformers 4.57 and 5.x both load the folder (see the HF contract, section 2)."""
        result = super().save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory)  # 4.x reads preprocessor_config.json
        path = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
            config["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes "TokenizersBackend"
            extra = config.get("extra_special_tokens")
            if isinstance(extra, list):  # 4.57 wants a dict here and the list under additional_special_tokens
                config["additional_special_tokens"] = extra
                config["extra_special_tokens"] = {}
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=2, ensure_ascii=False)
        return result


__all__ = [
    "KensaVLProcessor",
    "boxes_to_text",
    "text_to_boxes",
    "image_token_sequence",
    "special_tokens",
    "inspection_answer",
    "parse_inspection_answer",
]
