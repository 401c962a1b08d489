"""Few-shot inspection the way an inspection line uses it: show a support set once, then judge many products.

    inspector = Inspector.from_pretrained("outputs/run", noun="nut")
    inspector.set_support([support_item(good_1), support_item(good_2),
                           support_item(bad, description="a dark scratch", boxes=[[40, 60, 90, 70]])])
    for result in inspector.judge([query_1, query_2]):
        print(result.verdict, result.p_defective, result.text, result.boxes)
        result.heatmap  # where the query differs from the supports, in its pixels (a model with the comparison)

`set_support` encodes the support images once and keeps the language model's KV cache of the shared prompt
prefix; each query then costs only its own tokens. The prompt is the training episode's prompt
(`conversations.episode`), so what the model learnt is what it is asked.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from transformers.cache_utils import DynamicLayer

from kensa_vl.modeling.demos_kensa_vl import MAX_NAME_TOKENS, prompt_labels
from kensa_vl.modeling.modeling_kensa_vl import CACHE_KEY
from kensa_vl.processing.image_processing_kensa_vl import select_tile_grid, to_rgb
from kensa_vl.processing.processing_kensa_vl import (
    IMAGE_TOKEN,
    UNNAMED_DEFECT,
    grading_answer,
    parse_grading_answer,
    parse_inspection_answer,
    region_position,
    verdict_token_ids,
)
from kensa_vl.train.data import episode, grading_episode

from .model_folder import load_pretrained
from .support_check import UNLIKE_MARGIN, check_support, compared_features, query_message, unlike_message

logger = logging.getLogger(__name__)
# `fine_tiles="auto"`: a second budget of FINE_AUTO_SCALE**2 times the query's tiles, at most FINE_AUTO_MAX_TILES,
# where the support photos hold at least FINE_AUTO_SCALE times as many pixels per side as the query's budget compares
# (the rule validated at 448 and 768 px with the tiny model's four 112 px tiles: 16 tiles, docs/real-surfaces.md);
# smaller photos are judged at one budget. The cap keeps a real-size model's bank (12 tiles of 448 px, every view of
# every support tile) from growing 4x: at 16 tiles a cached query costs 2.7-3.7x on an H100 (BENCHMARKS.md)
FINE_AUTO_SCALE, FINE_AUTO_MAX_TILES = 2, 16
# `phases=2`: the second look moves every photo this many compared pixels (the tiles' pixels) up and left, a little
# over half of the comparison's 7 px cells (4 was chosen over 3 on the validation splits, docs/real-surfaces.md)
PHASE_SHIFT = 4
# the phases of `kensa-vl inspect`, `eval`, the demo and the main job's reports (an `Inspector` judges one unless
# told), and the numbers of phases there are
PHASES, PHASE_CHOICES = 2, (1, 2)


@dataclass
class Judgement:
    """One query's result; `boxes` are `[x0, y0, x1, y1]` in the query's pixels (x1, y1 exclusive). `heatmap`:
    where the query differs from the good supports, `(height, width)` float32 in the query's pixels, the log of the
    cosine distance to the nearest support cell (`distance_map`); None without a comparison against supports. A
    query file that cannot be read gets the verdict "error", P(defective) NaN and the reason as `text`."""

    verdict: str
    p_defective: float
    text: str = ""
    defect_type: str | None = None
    position: str | None = None
    boxes: list[list[int]] = field(default_factory=list)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    # the defective example the query resembles most (1-based, in support order), its name and the pointer's share
    # on it (`demos_kensa_vl.DemoPointer`), when the support holds named defective examples
    example: int | None = None
    example_name: str | None = None
    example_share: float | None = None
    # grading (support items with a `label`): the grade (also the `verdict`; `p_defective` is NaN), the pointer's
    # probability of each grade, and the limit sample (1-based, in support order) nearest the query along the grades
    grade: str | None = None
    grade_probabilities: dict[str, float] | None = None
    limit_sample: int | None = None
    # the query's cells lie exp(unlike) times as far from the good examples as theirs from each other, set where that
    # is above `support_check.UNLIKE_MARGIN` (another product or zoom; `Inspector(check_examples=True)`)
    unlike: float | None = None

    def to_dict(self) -> dict:
        """The JSON-ready fields (the heatmap is left out: an image, see `plots.heatmap_overlay`)."""
        return {k: v for k, v in asdict(self).items() if k != "heatmap"}


def support_item(image, defective: bool = False, description: str | None = None, boxes=None, defect_type=None,
                 label: str | None = None, limit: bool = False):  # fmt: skip
    """A support example in the episode format: a good image, or a defective one named by `defect_type`, or else by
    its `description` (the user's own words: "a dark scratch", "打痕"), or else "defect" (`UNNAMED_DEFECT`), with
    optional boxes (its pixels, `[x0, y0, x1, y1]`). The name is what an answer that matches this example copies; a
    description given beside a `defect_type` follows the box in the prompt.

    For grading, a graded example: `label` is its grade ("B", "1級", "too dark"), `limit` marks a limit sample
    (限度見本: the most its grade allows), and a `description` follows the label in the prompt."""
    image = to_rgb(image)
    if label is not None:
        if defective or boxes or defect_type:
            raise ValueError("a graded example (label=...) takes no defective flag, boxes or defect type")
        grading_answer(label)  # the name must be one a grading answer can carry
        return {"image": image, "defect_type": None, "grade": " ".join(label.split()), "limit": bool(limit),
                "note": " ".join((description or "").split()) or None}  # fmt: skip
    if limit:
        raise ValueError("limit=True marks a graded example's limit sample: give its grade as label=...")
    boxes = [list(map(int, b)) for b in (boxes or [])]
    if not defective:
        if description or boxes or defect_type:
            raise ValueError("a good support image takes no description, boxes or defect type")
        return {"image": image, "defect_type": None, "position": None, "boxes": [], "description": ""}
    for box in boxes:
        if len(box) != 4 or not (0 <= box[0] < box[2] <= image.width and 0 <= box[1] < box[3] <= image.height):
            raise ValueError(f"box {box} is not [x0, y0, x1, y1] inside the {image.width}x{image.height} image")
    name = " ".join((defect_type or description or UNNAMED_DEFECT).split())  # one line: the answer's name
    if ":" in name or " at " in f" {name} ":
        raise ValueError(f"a defect name cannot hold ':' or the word 'at' (they mark where a name ends): {name!r}")
    position = "center"
    if boxes:  # the cell of the boxes' centroid, as KensaSynth describes a defect by its mask's
        region = np.zeros((image.height, image.width), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            region[y0:y1, x0:x1] = True
        position = region_position(region)
    note = description if defect_type and description else ""
    return {"image": image, "defect_type": name, "position": position, "boxes": boxes, "description": note or ""}


def pixel_heatmap(cells: torch.Tensor, width: int, height: int) -> np.ndarray:
    """A cell map (`distance_map`) brought to the image's pixels (bilinear): `(height, width)` float32."""
    cells = cells.float().cpu().numpy()
    return np.asarray(Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def pixel_box(box, width: int, height: int) -> list[int]:
    """`[x0, y0, x1, y1]` as fractions of the image -> pixels, at least one pixel wide and high."""
    x0, y0, x1, y1 = (round(f * size) for f, size in zip(box, (width, height, width, height), strict=True))
    return [x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)]


def query_list(queries) -> list:
    """`judge`'s queries as a list: one image (PIL, array or path) or an iterable of them."""
    return [queries] if isinstance(queries, (Image.Image, str, np.ndarray)) else list(queries)


def fork_cache(cache):
    """A KV cache for one query that starts from the shared support prefix without copying it. A dynamic cache's
    layers grow by concatenation (`torch.cat` makes new tensors) and never write into the tensors they hold, so new
    layer objects over the same prefix tensors keep the shared cache intact; a deep copy would copy every cached key
    and value per query. Other caches (no `layers`, or layers that write in place) are deep-copied."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):  # exactly: no subclasses
        return copy.deepcopy(cache)
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in layers]
    return fork


class Inspector:
    """Judge query images against one support set (see the module docstring).

    Args:
        noun: what the product is called in the prompt ("nut", "marble slab", "product").
        threshold: P(defective) at or above which the verdict is "defective".
        cache: keep the KV cache of the support prefix (False recomputes the whole prompt per query).
        support_max_tiles / query_max_tiles: tile budget per support / query image (None: the processor's). With
            the reference comparison, a support budget below the query's is what the language model reads of each
            support; the comparison's bank still holds the supports at the query's budget (`support_bank`), when
            the support set is cached (`cache`).
        max_new_tokens: length of the generated description (0: score only, no text).
        graded_by: what graded examples are graded by, in the grading prompt ("colour shade", "gloss").
        check_examples: with the comparison, `set_support` looks for examples unlike the good ones (a photo of
            another product, `support_check.check_support`), keeps them in `unlike` and logs a warning for each;
            and `judge` measures each query the same way, setting `Judgement.unlike` (and logging a warning) for one
            unlike the good examples (another product or zoom). The check encodes each image once more with the
            compared encoders (the weight-free cells cost milliseconds; a pretrained tower, one more pass).
        fine_tiles: also judge every query with every photo cut into up to this many tiles (a second `Inspector`,
            which costs the query that much more), and take the mean of the two P(defective): a photo far larger than
            the compared resolution loses thin and faint defects in the resize, which the finer budget keeps, and the
            default budget keeps diffuse ones (docs/real-surfaces.md, "The 768 px photos at more tiles"). The text,
            boxes and heatmap are those of the budget whose verdict agrees with the mean's (the default's when both
            do). Inspection only (grading ignores it); `generate` and the pipeline judge at one budget. "auto":
            FINE_AUTO_SCALE**2 times the query's tile budget (at most FINE_AUTO_MAX_TILES), used for a support set
            whose photos are at least FINE_AUTO_SCALE times larger per side than that budget compares (`fine_active`),
            else not at all (nor where the cap leaves no more tiles than the budget).
        phases: 2 also judges every query with it and its supports moved PHASE_SHIFT compared pixels up and left
            (edge reflected; a second support set, and twice the work per query), and P(defective) is the mean of
            the two looks: the comparison's cells then sample the surface at a second phase, and the two
            measurements' noise partly cancels (docs/real-surfaces.md, "Two phases of the cell grid"). The text,
            boxes and heatmap are the unmoved look's, for the verdict of the mean. Where the fine budget judges a
            query (`fine_tiles`, `fine_active`), that is its second look and the moved one is not made (on 768 px
            validation photos both together gained nothing, at twice the time). Inspection only (grading ignores
            it); `generate` judges one look.
    """

    def __init__(
        self,
        model,
        processor,
        noun: str = "product",
        threshold: float = 0.5,
        cache: bool = True,
        support_max_tiles: int | None = None,
        query_max_tiles: int | None = None,
        max_new_tokens: int = 48,
        graded_by: str = "appearance",
        check_examples: bool = True,
        fine_tiles: int | str | None = None,
        phases: int = 1,
    ):
        self.model, self.processor, self.graded_by = model.eval(), processor, graded_by
        self.check_examples, self.unlike, self._normal = check_examples, [], None
        self.noun, self.threshold, self.cache = noun, threshold, cache
        self.fine_auto = fine_tiles == "auto"
        budgets = {"support_max_tiles": support_max_tiles, "query_max_tiles": query_max_tiles}
        for name, tiles in {**budgets, "fine_tiles": fine_tiles}.items():
            if self.fine_auto and name == "fine_tiles":  # a share of the query's budget, known good by now
                budget = query_max_tiles or processor.image_processor.max_tiles
                tiles = fine_tiles = min(FINE_AUTO_SCALE**2 * budget, FINE_AUTO_MAX_TILES)
            if tiles is not None and (not isinstance(tiles, int) or tiles < 1):  # 0 would read as "the default"
                other = ", 'auto'" if name == "fine_tiles" else ""
                raise ValueError(f"{name} must be a whole number of tiles >= 1{other} or None, got {tiles!r}")
        self.support_max_tiles, self.query_max_tiles = support_max_tiles, query_max_tiles
        self.max_new_tokens = max_new_tokens
        if phases not in PHASE_CHOICES:
            raise ValueError(f"phases must be 1 (the photos as they are) or 2 (and moved half a cell), got {phases!r}")
        self.fine_active = fine_tiles is not None and not self.fine_auto  # "auto" decides in `set_support`
        self._fine_told = False
        self.fine = None if fine_tiles is None else Inspector(
            model, processor, noun, threshold, cache, support_max_tiles=fine_tiles, query_max_tiles=fine_tiles,
            max_new_tokens=max_new_tokens, graded_by=graded_by, check_examples=False,
        )  # fmt: skip
        self.phase = None if phases == 1 else MovedLook(
            model, processor, noun, threshold, cache, support_max_tiles, query_max_tiles, max_new_tokens=0,
            graded_by=graded_by, check_examples=False,
        )  # fmt: skip
        self.verdict_ids = verdict_token_ids(processor.tokenizer)
        self.support: list[dict] | None = None
        if getattr(model.config, "reference_comparison", False):
            if "reference_banks" not in inspect.signature(model.model.forward).parameters:
                raise ValueError(
                    "this model folder's remote code predates `ReferenceBank` (kensa-vl 0.1): copy the current "
                    "modeling/*.py files into it (the weights are unchanged), or build it again"
                )

    def __copy__(self) -> Inspector:
        """An inspector over the same model whose `set_support` leaves this one's support set alone, in every look:
        the fine budget's (`fine_tiles`) and the moved one's (`phases`) are copied too (the demo keeps one copy per
        user's support set)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.fine, other.phase = copy.copy(self.fine), copy.copy(self.phase)
        return other

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, dtype=None, config: dict | None = None,
                        **kwargs) -> Inspector:  # fmt: skip
        """An Inspector on a saved KensaVL; `config` replaces the folder's settings (`{"reference_coreset": 0.25}`)."""
        model, processor = load_pretrained(path, dtype, **(config or {}))
        return cls(model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), processor, **kwargs)

    @property
    def device(self):
        return self.model.device

    @property
    def grades(self) -> list[str]:
        """The support's grades in order of first appearance (empty unless it holds graded examples)."""
        return list(dict.fromkeys(s["grade"] for s in self.support or [] if "grade" in s))

    def _prompt(self, support: list[dict]) -> tuple[str, str]:
        """The episode prompt split before the query image: (shared prefix, per-query suffix)."""
        placeholder = {"image": Image.new("RGB", (1, 1)), "defect_type": None, "position": None, "boxes": []}
        if self.grades:
            grades = [self.grades.index(s["grade"]) for s in support]
            placeholder["noun"] = self.noun
            messages = grading_episode(support, grades, placeholder, self.grades, self.graded_by)["messages"]
        else:
            messages = episode(support, placeholder, self.noun, self.processor.num_loc_bins)["messages"][:1]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        cut = text.rindex(IMAGE_TOKEN)
        return text[:cut], text[cut:]

    def _encode(self, text: str, images: list, max_tiles, first: bool) -> dict:
        tiles = [max_tiles] * len(images) if max_tiles else None
        batch = self.processor(
            text=text, images=images or None, max_tiles=tiles, add_special_tokens=first, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def set_support(self, support: list[dict]) -> None:
        """Show the support set (items from `support_item` or KensaSynth rows); encodes it once when caching."""
        if support and all(s["defect_type"] is not None for s in support):
            raise ValueError(
                f"the support set has {len(support)} defective images and no good one: show at least one good "
                "example (an empty support set judges without examples)"
            )
        for number, item in enumerate(support, 1):
            name, tokenizer = item["defect_type"], self.processor.tokenizer
            length = 0 if name is None else len(tokenizer(" " + name, add_special_tokens=False).input_ids)
            if length > MAX_NAME_TOKENS:
                raise ValueError(
                    f"example {number}'s name is {length} tokens long; a name the answer can copy holds at most "
                    f"{MAX_NAME_TOKENS}: shorten it ({name[:40]!r}...), or give it as `defect_type` with the longer "
                    "`description` beside it"
                )
        self._check_grades(support)
        self.support = list(support)
        self._prefix_text, self._suffix_text = self._prompt(self.support)
        self._cache, self._bank, self._suffix_ids = None, None, {}
        compares = getattr(self.model.config, "reference_comparison", False) and bool(self.support)
        if self.cache or compares:  # uncached, the supports' bank still gives the boxes and heatmaps (`_evidence`)
            images = [s["image"] for s in self.support]
            self._prefix = self._encode(self._prefix_text, images, self.support_max_tiles, first=True)
            # the supports' cells (every view) and their scores against each other, encoded once: from the prompt's
            # forward pass, or when the language model reads the supports at fewer tiles than the query, from the
            # compared encoders alone on every tile the query has (`support_bank`)
            separate = compares and self._bank_max_tiles() != self._prompt_max_tiles()
            extra = {"return_reference_bank": True} if compares and not separate else {}
            out = self.model(**self._prefix, use_cache=self.cache, **extra)
            self._cache = getattr(out, CACHE_KEY) if self.cache else None
            if separate:
                full = self.processor.image_processor(images, max_tiles=self._bank_max_tiles(), return_tensors="pt")
                full = {k: v.to(self.device) for k, v in full.items()}
                ids, tiles = self._prefix["input_ids"][0].tolist(), self._prefix["image_grid"][:, 2].tolist()
                labels = prompt_labels(ids, tiles, self.model.config.tokens_per_tile, self.model.config)
                self._bank = self.model.model.support_bank(full["pixel_values"], full["image_grid"], labels)
            elif compares:
                self._bank = out.reference_bank[0]
        if self.fine_auto:
            larger = self._photos_scale([s["image"] for s in self.support]) >= FINE_AUTO_SCALE
            self.fine_active = larger and self.fine.query_max_tiles > self._bank_max_tiles()
            if self.fine_active and not self._fine_told:  # once per inspector, not per support set
                self._fine_told, tiles = True, self.fine.query_max_tiles
                logger.info("the support photos are %dx or more larger per side than compared: each query is judged "
                            "again at %d tiles", FINE_AUTO_SCALE, tiles)  # fmt: skip
        if self._judges_twice:
            self._settings_to(self.fine)
            self.fine.set_support(support)
        if self._judges_moved:
            self._settings_to(self.phase)
            self.phase.set_support(support)
        self.unlike, self._normal = [], None
        if compares and self.check_examples:
            self.unlike, self._normal = check_support(self.model, self.processor, self.support, self._bank_max_tiles())
            for number, excess in self.unlike:
                logger.warning(unlike_message(number, excess, self.support[number - 1]["defect_type"] is not None))

    def _check_grades(self, support: list[dict]) -> None:
        """Grading needs graded examples only, of two or more grades, no photo in two grades, and a model that
        reads grades (with the comparison)."""
        graded = [s for s in support if "grade" in s]
        if not graded:
            return
        grades = list(dict.fromkeys(s["grade"] for s in graded))
        if len(graded) != len(support) or len(grades) < 2:
            raise ValueError(
                f"grading needs graded examples only (label=...) of at least two grades; got {len(graded)} graded "
                f"of {len(support)} examples, grades {grades}"
            )
        seen = {}
        for number, item in enumerate(support, 1):
            key = item["image"].tobytes() + str(item["image"].size).encode()
            if seen.get(key, (None, item["grade"]))[1] != item["grade"]:
                raise ValueError(
                    f"example {number} is the same photo as example {seen[key][0]} but labelled "
                    f"{item['grade']!r}, not {seen[key][1]!r}: one photo cannot be in two grades"
                )
            seen.setdefault(key, (number, item["grade"]))
        if not (getattr(self.model.config, "reference_comparison", False) and self.model.config.grade_marks):
            raise ValueError("this model does not grade: it needs the reference comparison and a tokenizer whose "
                             "grade marks were set when it was built (config.grade_marks)")  # fmt: skip

    def _photos_scale(self, images: list[Image.Image]) -> float:
        """How many times more pixels per side the median of `images` holds than the query's tile budget compares
        (its tiles' pixels), 0 without images."""
        if not images:
            return 0.0
        processor = self.processor.image_processor
        tile, budget = processor.tile_size, self.query_max_tiles or processor.max_tiles
        pixels = float(np.median([image.width * image.height for image in images]))
        return (pixels / (budget * tile * tile)) ** 0.5

    def _prompt_max_tiles(self) -> int:
        return self.support_max_tiles or self.processor.image_processor.max_tiles

    def _bank_max_tiles(self) -> int:
        """The supports' tile budget in the comparison's bank: the query's, so that cells of one scale meet."""
        return max(self._prompt_max_tiles(), self.query_max_tiles or self.processor.image_processor.max_tiles)

    def _query_inputs(self, image: Image.Image) -> dict:
        if self._cache is None:  # the whole prompt from scratch, as a caller without this API would run it
            default = self.processor.image_processor.max_tiles
            tiles = [self.support_max_tiles or default] * len(self.support) + [self.query_max_tiles or default]
            images = [s["image"] for s in self.support] + [image]
            batch = self.processor(
                text=self._prefix_text + self._suffix_text, images=images, max_tiles=tiles, return_tensors="pt"
            )
            return {k: v.to(self.device) for k, v in batch.items()}
        suffix = self._query_suffix(image)
        ids = torch.cat([self._prefix["input_ids"], suffix["input_ids"]], 1)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs.update(pixel_values=suffix["pixel_values"], image_grid=suffix["image_grid"])
        return {**inputs, "reference_banks": [self._bank]} if self._bank else inputs

    def _query_suffix(self, image: Image.Image) -> dict:
        """The query's own inputs after the cached prefix: its tiles, and the suffix's token ids, which depend only on
        the tile grid, so they are tokenised once per grid (`_suffix_ids`) and every later query with that grid
        only has its image processed."""
        tiles = {"max_tiles": self.query_max_tiles} if self.query_max_tiles else {}
        pixels = self.processor.image_processor([image], **tiles, return_tensors="pt")
        grid = tuple(pixels["image_grid"][0].tolist())
        if grid not in self._suffix_ids:
            encoded = self._encode(self._suffix_text, [image], self.query_max_tiles, first=False)
            self._suffix_ids[grid] = encoded["input_ids"]
        return {"input_ids": self._suffix_ids[grid], **{k: v.to(self.device) for k, v in pixels.items()}}

    def _forward(self, inputs: dict, cache, **kwargs):
        """The model on `inputs` after the cached prefix (`cache`), with the query's reference distances."""
        if self._bank:
            kwargs["return_reference_distances"] = True
        return self.model(**inputs, **{CACHE_KEY: cache}, logits_to_keep=1, **kwargs)

    def _evidence(self, inputs: dict, image: Image.Image, verdict: str, distances=None) -> dict:
        """From the reference comparison's `distances` of the query (the inputs' last image) to the supports' bank:
        the heatmap in the query's pixels and, for a defective verdict, the box of the most anomalous region
        (`locate_box`, which places a defect better than the LM's box tokens, docs/reference-comparison.md). Empty
        without a comparison against supports."""
        if distances is None:
            return {}
        grid = inputs["image_grid"][-1, :2].tolist()
        comparison, levels = self.model.model.reference_comparison, self._bank.levels
        cells = comparison.heatmap(distances, *grid, levels)
        out = {"heatmap": pixel_heatmap(cells, image.width, image.height)}
        if verdict != "good":
            box, _ = comparison.locate(distances, *grid, levels)  # the box `generate` copies
            out["boxes"] = [pixel_box(box, image.width, image.height)]
        return out

    @torch.no_grad()
    def judge(self, queries, batch_size: int = 1) -> list[Judgement]:
        """Judge one image or a list (PIL images or paths); one `Judgement` per query, in order.

        `batch_size` > 1 runs up to that many queries through one forward pass when scoring only
        (`max_new_tokens=0`) from a cached support set: queries whose prompts have the same length (same tile
        grid) share a batch, and the results equal one-by-one judging within float tolerance."""
        if self.support is None:
            raise ValueError("call set_support(...) before judge(...) (an empty list judges without examples)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        queries = query_list(queries)
        out, images = [None] * len(queries), {}
        for index, query in enumerate(queries):
            try:
                images[index] = to_rgb(query)
            except ValueError as err:
                if not isinstance(query, str) and not hasattr(query, "__fspath__"):
                    raise
                out[index] = Judgement("error", float("nan"), str(err))  # an unreadable file: say so, judge the rest
        if self._judges_twice:  # scores only: its text is written where its verdict is kept
            self._settings_to(self.fine)
            self.fine.max_new_tokens = 0
            fine = self.fine.judge(list(images.values()), batch_size)
        moved = {}  # the moved look's P(defective) per query, which the unmoved look's verdict averages in
        if self._judges_moved:
            self._settings_to(self.phase)
            looks = self.phase.judge(list(images.values()), batch_size)
            moved = {index: look.p_defective for index, look in zip(images, looks, strict=True)}
        if batch_size == 1 or self._cache is None or self.max_new_tokens > 0 or self.grades:
            for index, image in images.items():
                out[index] = self._grade_one(image) if self.grades else self._judge_one(image, moved.get(index))
        else:
            inputs = {index: self._query_inputs(image) for index, image in images.items()}
            groups = {}
            for index, x in inputs.items():
                groups.setdefault(x["input_ids"].shape[1], []).append(index)
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    chosen = group[start : start + batch_size]
                    judged = self._judge_batch(
                        [inputs[i] for i in chosen], [images[i] for i in chosen], [moved.get(i) for i in chosen]
                    )
                    for index, result in zip(chosen, judged, strict=True):
                        out[index] = result
        if self._judges_twice:
            for (index, image), other in zip(images.items(), fine, strict=True):
                out[index] = self._both_budgets(out[index], other, image)
        return out

    @property
    def _judges_twice(self) -> bool:
        """Whether each query is judged at the fine budget too (`fine_tiles`; inspection, not grading)."""
        return self.fine_active and not self.grades

    @property
    def _judges_moved(self) -> bool:
        """Whether each query is judged moved half a cell too (`phases=2`; inspection, not grading, and not where
        the fine budget is the second look)."""
        return self.phase is not None and not self.grades and not self._judges_twice

    def _settings_to(self, other: Inspector) -> None:
        """What a caller may change between calls (`noun`, `threshold`), for another look (`fine`, `phase`) too."""
        other.noun, other.threshold = self.noun, self.threshold

    def _both_budgets(self, judged: Judgement, fine: Judgement, image: Image.Image | None = None) -> Judgement:
        """One query's judgements at the default and the fine budget (`fine_tiles`) as one: the mean P(defective),
        the verdict at the threshold, and the rest from the budget whose own verdict agrees (the default's first).
        `fine` is scored only; where it is kept and text is asked for, the fine budget writes it for `image`."""
        p_defective = (judged.p_defective + fine.p_defective) / 2
        verdict = "defective" if p_defective >= self.threshold else "good"
        chosen = judged if judged.verdict == verdict else fine
        if chosen is fine and self.max_new_tokens and image is not None:
            self.fine.max_new_tokens = self.max_new_tokens
            chosen = self.fine.judge(image)[0]
        return replace(chosen, verdict=verdict, p_defective=p_defective, unlike=judged.unlike)

    def _judge_batch(self, inputs: list[dict], images: list[Image.Image], moved: list) -> list[Judgement]:
        """Score queries of equal prompt length in one forward pass over the cached prefix (repeated per row);
        `moved`: each query's P(defective) in the moved look, or None."""
        batch = {
            k: torch.cat([x[k] for x in inputs]) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid")
        }
        batch["input_ids"] = batch["input_ids"][:, self._prefix["input_ids"].shape[1] :]
        if self._bank:
            batch["reference_banks"] = [self._bank] * len(inputs)
        cache = fork_cache(self._cache)
        cache.batch_repeat_interleave(len(inputs))
        forward = self._forward(batch, cache, use_cache=False)
        distances = getattr(forward, "reference_distances", None) or [None] * len(inputs)  # one query per row
        out = []
        for row, (x, image) in enumerate(zip(inputs, images, strict=True)):
            verdict, p_defective = self._verdict(forward.logits[row, -1], moved[row])
            evidence = self._evidence(x, image, verdict, distances[row])
            evidence.update(self._matched(getattr(forward, "pointers", None), row), **self._query_check(image))
            out.append(Judgement(verdict, p_defective, **evidence))
        return out

    def _matched(self, pointers, row: int = 0) -> dict:
        """The defective example a row's query resembles most (1-based among the supports) and the pointer's share
        on it; empty without named defective examples."""
        pointer = next((p for p in pointers or [] if p.row == row and p.names), None)
        if pointer is None:
            return {}
        shares = torch.softmax(pointer.logits.float(), 0)
        defective = [n for n, s in enumerate(self.support, 1) if s["defect_type"] is not None]
        best = int(shares.argmax())
        name = self.support[defective[best] - 1]["defect_type"]
        return {"example": defective[best], "example_name": name, "example_share": round(float(shares[best]), 4)}

    def _query_check(self, image: Image.Image) -> dict:
        """`unlike` for a query whose cells lie far from the good examples' (`support_check.Normal`), with a logged
        warning; empty where it lies near them or nothing is checked."""
        if self._normal is None:
            return {}
        excess = self._normal.excess(compared_features(self.model, self.processor, image, self.query_max_tiles))
        if excess <= UNLIKE_MARGIN:
            return {}
        logger.warning(query_message(excess))
        return {"unlike": round(excess, 4)}

    def _verdict(self, logits: torch.Tensor, moved: float | None = None) -> tuple[str, float]:
        """The answer's first-token logits -> (verdict, P(defective)) from the "good" and "defective" tokens,
        averaged with the moved look's P(defective) where there is one (`phases=2`)."""
        p_defective = torch.softmax(logits.float()[list(self.verdict_ids)], 0)[1].item()
        p_defective = p_defective if moved is None else (p_defective + moved) / 2
        return ("defective" if p_defective >= self.threshold else "good"), p_defective

    def _score(self, image: Image.Image) -> tuple[dict, object]:
        """One query's inputs (the whole prompt) and the model's output on it, after the cached prefix if any."""
        inputs = self._query_inputs(image)
        cache = fork_cache(self._cache) if self._cache is not None else None
        step = dict(inputs)
        if cache is not None:  # the prefix is in the cache: run the query's own tokens only
            step["input_ids"] = inputs["input_ids"][:, self._prefix["input_ids"].shape[1] :]
        return inputs, self._forward(step, cache, use_cache=self.max_new_tokens > 0)

    def _judge_one(self, image: Image.Image, moved: float | None = None) -> Judgement:
        inputs, out = self._score(image)
        verdict, p_defective = self._verdict(out.logits[0, -1], moved)
        distances = getattr(out, "reference_distances", None)
        evidence = self._evidence(inputs, image, verdict, distances and distances[-1])
        evidence.update(self._matched(getattr(out, "pointers", None)), **self._query_check(image))
        if self.max_new_tokens == 0:
            return Judgement(verdict, p_defective, **evidence)
        text = self._describe(inputs, getattr(out, CACHE_KEY), verdict, getattr(out, "pointers", None))
        parsed = parse_inspection_answer(text, image.width, image.height, self.processor.num_loc_bins)
        boxes = [list(map(int, b)) for b in np.asarray(parsed["boxes"]).reshape(-1, 4)] if verdict != "good" else []
        evidence.setdefault("boxes", boxes)
        return Judgement(verdict, p_defective, text, parsed["defect_type"], parsed["position"], **evidence)

    def _grade_one(self, image: Image.Image) -> Judgement:
        """A graded query: the grade pointer's probabilities, the generated answer's grade (the pointer's best when
        the text names none), and the limit sample nearest the query along the grades (`grade_axis`)."""
        from kensa_vl.modeling.grading_kensa_vl import grade_axis

        inputs, out = self._score(image)
        pointer = next(p for p in out.pointers if p.graded)
        probabilities = dict(zip(self.grades, torch.softmax(pointer.logits.float(), 0).tolist(), strict=True))
        tokenizer, text = self.processor.tokenizer, ""
        if self.max_new_tokens:  # at least "grade: <the longest name>,"
            longest = max(
                len(tokenizer(grading_answer(g) + ",", add_special_tokens=False).input_ids) for g in self.grades
            )
            # the greedy first token, read off the scoring pass (the grade's name mixed in), is fed as a new token:
            # no prompt token runs again, and the answer is the one plain `generate` writes (tested)
            first = int(out.logits[0, -1].argmax())
            if first != tokenizer.eos_token_id:
                text = self._generate(inputs, getattr(out, CACHE_KEY), out.pointers, [first], longest - 1)
        grade = parse_grading_answer(text)["grade"]  # cut short, or written by the language model: the pointer's
        grade = grade if grade in probabilities else max(probabilities, key=probabilities.get)
        stats, graded = pointer.stats, self._bank.graded
        groups = torch.tensor([self.grades.index(s["grade"]) for s in self.support], device=stats.device)
        axis, _, _ = grade_axis(torch.stack([d.stats for d in graded]), groups)
        limits = [n for n, s in enumerate(self.support) if s["limit"]]
        nearest = min(limits, key=lambda n: abs(float((graded[n].stats - stats) @ axis)), default=None)
        return Judgement(grade, float("nan"), text, grade=grade, grade_probabilities=probabilities,
                         limit_sample=None if nearest is None else nearest + 1)  # fmt: skip

    def _generate(self, inputs: dict, cache, pointers, first: list[int] = (), max_new_tokens: int = 0) -> str:
        """Greedy answer after `first` (token ids), from `cache`, which holds the whole prompt (images included), so
        generation feeds only new tokens; `pointers` (the scoring pass's) let the answer copy names and grades. At
        least `max_new_tokens`, and the Inspector's."""
        ids = torch.cat([inputs["input_ids"], torch.tensor([list(first)], device=self.device, dtype=torch.long)], 1)
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **{CACHE_KEY: cache},  # holds every image already: only the new tokens run
            **({"pointers": pointers} if pointers else {}),
            max_new_tokens=max(self.max_new_tokens, max_new_tokens),
            do_sample=False,
        )
        return self.processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def _describe(self, inputs: dict, cache, verdict: str, pointers=None) -> str:
        """Greedy answer that starts with the verdict read from P(defective), so text and score agree. `cache` holds
        the whole prompt (images included), so generation feeds only new tokens; `pointers` (the scoring pass's)
        let the answer copy a defective example's name."""
        if verdict == "good":
            return "good"
        return self._generate(inputs, cache, pointers, [self.verdict_ids[1]])


class MovedLook(Inspector):
    """The second look of `phases=2`: every photo, supports and queries, moved PHASE_SHIFT compared pixels up and
    left (edge reflected; a support's boxes with it), so the comparison's cells fall at another phase of the
    surface. Its P(defective) is what the unmoved look averages in; it places no heatmap or box."""

    def set_support(self, support: list[dict]) -> None:
        tiles = self._bank_max_tiles()
        super().set_support([self._moved_item(item, tiles) for item in support])

    def judge(self, queries, batch_size: int = 1) -> list[Judgement]:
        tiles = self.query_max_tiles or self.processor.image_processor.max_tiles
        return super().judge([self._moved(query, tiles)[0] for query in query_list(queries)], batch_size)

    def _evidence(self, inputs: dict, image: Image.Image, verdict: str, distances=None) -> dict:
        """None: the unmoved look's heatmap and box are the ones reported, so this look places none."""
        return {}

    def _moved(self, image, max_tiles: int) -> tuple[Image.Image, int, int]:
        """`image` (any mode, or a path) moved PHASE_SHIFT of its compared pixels (at `max_tiles`) up and left, in
        RGB, and the move (dx, dy)."""
        image, tile = to_rgb(image), self.processor.image_processor.tile_size
        rows, cols = select_tile_grid(image.width, image.height, tile, max_tiles)
        dx = min(round(PHASE_SHIFT * image.width / (cols * tile)), image.width - 1)
        dy = min(round(PHASE_SHIFT * image.height / (rows * tile)), image.height - 1)
        pixels = np.pad(np.asarray(image), ((0, dy), (0, dx), (0, 0)), mode="reflect")[dy:, dx:]
        return Image.fromarray(pixels), dx, dy

    def _moved_item(self, item: dict, max_tiles: int) -> dict:
        image, dx, dy = self._moved(item["image"], max_tiles)
        boxes = [[max(x0 - dx, 0), max(y0 - dy, 0), max(x1 - dx, 1), max(y1 - dy, 1)] for x0, y0, x1, y1 in
                 item.get("boxes") or []]  # fmt: skip
        return {**item, "image": image, **({"boxes": boxes} if "boxes" in item else {})}
