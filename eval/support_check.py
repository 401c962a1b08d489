"""Examples that do not belong: a photo of another product (or a wrong file) among the support examples.

The comparison takes the good examples as the product's own measure of normal; one photo of another product among
them widens that measure and hides defects, and a defective example of another product names nothing a query can
show. Per compared encoder, an example's *typical distance* is the median, over the cells of its grid tiles, of the
cosine distance to the nearest cell of the other good examples (their bank, views included, as the comparison's).
A good example lies about as far from the others as they lie from each other; a photo of another product lies farther
almost everywhere, while a defect of the product moves a few cells, which the median ignores. An example is *unlike*
the others when the log of its typical distance exceeds the good examples' own (each against the others; their
median) by more than UNLIKE_MARGIN, averaged over the compared encoders: its cells lie exp(excess) times as far.

UNLIKE_MARGIN is the smallest that calls at most 1 in 100 good examples unlike on the validation splits of KensaSynth
and of the real-surface set (`benchmarks/unlike_examples.py`, docs/inspection.md): there it calls about 0.8 of the
photos of another synthetic product unlike and 0.4 of another real surface (a second concrete or dark wood looks much
like the first), and 0 to 0.01 of the product's defective examples.

A query is measured the same way, against all the good examples (`Normal.excess`): a photo of another product or
zoom is flagged defective by the comparison almost everywhere, and the verdict alone does not say why. The same
margin calls no good or defective query of the product on those validation splits and 0.9 (KensaSynth) and 0.5 (real
surfaces) of another product's photos (`benchmarks/unlike_examples.py`).

With a model whose comparison masks the background (an encoder entry's `masks_background`), every image is measured
on its product's cells alone where it shows a background, as the comparison reads it: a part on another tray is not
unlike its examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kensa_vl.modeling.comparison_kensa_vl import (
    product_cells,
    product_mask,
    scored_tiles,
    thumbnail_tiles,
    unit_cells,
)
from kensa_vl.modeling.locate_kensa_vl import LOG_FLOOR
from kensa_vl.modeling.search_kensa_vl import nearest_distances
from kensa_vl.processing.image_processing_kensa_vl import to_rgb

UNLIKE_MARGIN = 0.75  # e^0.75 = 2.1 times as far
# a query's median is read on every second row and column of its cells: a quarter of the search, the same calls on
# the validation splits (docs/inspection.md)
QUERY_STRIDE = 2


@torch.no_grad()
def compared_features(model, processor, image, max_tiles: int | None = None, views=None, reference: bool = False):
    """One image as the comparison sees it: (name -> `(tiles, g, g, C)` L2-normalised cells of each encoder the model
    compares, thumbnail flags, the tile grid's rows and columns, the image's width and height, and for a `reference`
    its bank cells, name -> `(cells, C)`, with its copies in `views` (None: the model's `reference_views`))."""
    image = to_rgb(image)
    batch = processor.image_processor([image], max_tiles=max_tiles, return_tensors="pt")
    names = model.config.reference_encoder_names()
    pixel_values = batch["pixel_values"].to(model.device)
    cells = unit_cells(model.model.image_grids(pixel_values, names), names)
    grid = batch["image_grid"][0, :2].tolist()
    # the model's own bank (views included; it needs no comparison module, so a plain-ICL model's works too)
    bank = model.model.reference_cells(pixel_values, cells, views) if reference else None
    return cells, thumbnail_tiles(batch["image_grid"]).to(model.device), grid, image.size, bank


def typical_distance(features, others: list, stride: int = 1, masking: str | None = None) -> np.ndarray:
    """Per compared encoder, the log of the median distance of `features`' grid-tile cells (`compared_features`;
    every `stride`-th row and column of each tile's cells) to the nearest bank cell of `others` (their
    `compared_features` with `reference=True`): `(encoders,)`. With `masking` (the model's encoder that
    `masks_background`), over the product's cells alone where the image shows a background (`product_mask`)."""
    cells, thumbnail, (rows, cols), *_ = features
    scored = scored_tiles(thumbnail)
    product = None if masking is None else product_mask(cells[masking][scored], rows, cols)
    out = []
    for name, query in cells.items():
        bank = torch.cat([other[-1][name] for other in others])
        distances = nearest_distances(query[scored][:, ::stride, ::stride], bank)
        if product is not None:
            distances = distances[product_cells(product, rows, cols, query.shape[1])[:, ::stride, ::stride]]
        out.append(math.log(max(float(distances.float().median()), LOG_FLOOR)))
    return np.array(out)


def background_masking(model) -> str | None:
    """The encoder of `model`'s comparison that `masks_background`, if any."""
    return getattr(getattr(model.model, "reference_comparison", None), "masking", None)


@dataclass
class Normal:
    """The good examples as the check measures them: their `compared_features` (bank cells included) and `level`,
    the median over them of each one's `typical_distance` to the others `(encoders,)`."""

    features: list
    level: np.ndarray
    masking: str | None = None

    def excess(self, features, stride: int = QUERY_STRIDE) -> float:
        """How much farther an image's cells (`compared_features`, read at `stride`) lie from the good examples than
        theirs from each other: the mean over compared encoders of its log typical distance minus `level`."""
        return float((typical_distance(features, self.features, stride, self.masking) - self.level).mean())


def measure_support(model, processor, support: list[dict], max_tiles: int | None = None):
    """Per support item (in order), how much farther its cells lie from the good examples than theirs from each
    other (`Normal.excess`); and the good examples' `Normal`, which measures a query the same way (None with fewer
    than two). A good example is measured against the other good ones when there are at least three (with two,
    neither can be told from the other), a defective one against all of them; None where it is not measured."""
    features = [compared_features(model, processor, s["image"], max_tiles, reference=True) for s in support]
    good = [i for i, s in enumerate(support) if s["defect_type"] is None]
    masking = background_masking(model)
    own = {}  # each good example against the other good ones
    for i in good if len(good) > 1 else []:
        own[i] = typical_distance(features[i], [features[j] for j in good if j != i], masking=masking)
    out = []
    for i, item in enumerate(support):
        if item["defect_type"] is None and len(good) < 3:
            out.append(None)
            continue
        peers = [own[j] for j in good if j != i and j in own]  # none with a single good example
        measured = own[i] if i in own else typical_distance(features[i], [features[j] for j in good], masking=masking)
        out.append(float((measured - np.median(peers, 0)).mean()) if peers else None)
    normal = Normal([features[i] for i in good], np.median(list(own.values()), 0), masking) if own else None
    return out, normal


def example_excess(model, processor, support: list[dict], max_tiles: int | None = None) -> list[float | None]:
    """`measure_support`'s excess of each support item."""
    return measure_support(model, processor, support, max_tiles)[0]


def check_support(model, processor, support: list[dict], max_tiles: int | None = None,
                  margin: float = UNLIKE_MARGIN) -> tuple[list[tuple[int, float]], Normal | None]:  # fmt: skip
    """The examples (1-based, in support order) whose excess is above `margin`, with their excess, and the good
    examples' `Normal` for the queries. Graded supports are not checked (grades differ in the whole surface's look by
    design), nor a model without the comparison: ([], None)."""
    if any("grade" in s for s in support) or not getattr(model.config, "reference_comparison", False):
        return [], None
    excess, normal = measure_support(model, processor, support, max_tiles)
    return [(n, e) for n, e in enumerate(excess, 1) if e is not None and e > margin], normal


def unlike_examples(model, processor, support: list[dict], max_tiles: int | None = None,
                    margin: float = UNLIKE_MARGIN) -> list[tuple[int, float]]:  # fmt: skip
    """`check_support`'s examples unlike the good ones."""
    return check_support(model, processor, support, max_tiles, margin)[0]


def unlike_message(number: int, excess: float, defective: bool) -> str:
    """What the user is told about an example `unlike_examples` names."""
    others = "the good examples" if defective else "the other good examples"
    return (
        f"example {number} looks unlike {others}: its cells lie {math.exp(excess):.1f}x as far from them as theirs "
        f"from each other (more than {math.exp(UNLIKE_MARGIN):.1f}x is unlike). Another product, another zoom (the "
        "photo's scale after tiling), or a wrong file? The comparison takes the good examples as the product's normal."
    )


def query_message(excess: float) -> str:
    """What the user is told about a query whose `Normal.excess` is above UNLIKE_MARGIN."""
    return (
        f"the query looks unlike the good examples: its cells lie {math.exp(excess):.1f}x as far from them as theirs "
        f"from each other (more than {math.exp(UNLIKE_MARGIN):.1f}x is unlike). Another product or another zoom? Its "
        "verdict compares it with the examples' product"
    )
