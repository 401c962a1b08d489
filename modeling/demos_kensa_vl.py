"""Examples that say something: the prompt's good and defective examples told apart by the words after each image,
and a pointer from a query to the defective example it resembles, whose name the answer then copies.

- A demo's label is the text right after its image (the episode format, `processing_kensa_vl.inspection_answer`):
  `good`, or `defective: <name> at the ...`. `read_label` reads it off the token ids. Good and unlabeled images are
  the comparison's references (its good bank); a defective one never is, so a query showing a demo's defect is not
  masked by it.
- Each defective demo is searched against the good bank: its DEFECT_CELLS farthest cells are its defect, within the
  box its label gives when it gives one (`label_box`: the user said where the defect is). A query's
  own farthest cells are compared with each demo's defect, on the sharp encoders' cells
  (`KensaVLReferenceComparison.defect_cells`), and its look and form with the demo's (`region_descriptor`,
  `match_similarity`): the nearer, the likelier it shows that defect.
- `DemoPointer` turns those similarities into a pointer over the demos and a gate, and `copy_names` makes a
  pointer-generator (See et al., 2017) of the answer's name: after `defective`, the next token's probability mixes
  the language model's with the next token of each demo's label (`: <name>`, up to its " at") that agrees with what
  was written so far, weighted by the pointer. Swapping two demos' names swaps the answer's.
- Graded examples (`grade: <name>`) are read the same way; a query after them is graded by its whole-image
  statistics (`grading_kensa_vl.py`) and its answer copies `grade: <name>,` of the grade it is closest to.
- The query's box (`locate_box`, what the Inspector draws) is copied the same way: after the name's " at", the
  position words of its centre and the box's opening (" the top left <box>"), then its four location tokens and
  `</box>`. Plain `generate` and the pipeline write the comparison's box and say where it is.
- `BoxGrammar` keeps every generated box well formed, copied or not: four location tokens after `<box>`, the
  second corner right of and below the first, then `</box>`; no location token or `</box>` outside a box.

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LogitsProcessor

DEFECT_CELLS = 8  # a demo's defect and a query's suspect region: their farthest cells from the good bank
# a region's descriptor (`region_descriptor`) in units of: 0.1 of mean colour and of its spread against the surround
# (per RGB channel), 2 of log area and of log aspect; a unit of descriptor distance costs REGION_SHARE of cosine
# similarity in `match_similarity`. Chosen on KensaSynth's training categories' naming sets, then checked on the
# validation categories (docs/naming-by-example.md).
REGION_SCALE = (10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 0.5, 0.5)
REGION_SHARE = 0.5
REGION_RING = 0.5  # the surround: a ring this share of the region's longer side wide (at least 2% of the image)
# a region's form (`region_form`): the cosine similarity a unit of difference costs, per unit of its fill,
# elongation, log edge ratio and edge coherence (each a share over about its spread across KensaSynth's training
# defects: 0.2, 0.3, 0.8, 0.3). Added to the look's cost, not inside its norm: there the colour terms drown them.
FORM_COST = (0.5 / 0.2, 0.5 / 0.3, 0.25 / 0.8, 0.25 / 0.3)
FORM_DEVIATION = 2.5  # a pixel unlike the surround: this far from its mean, in its standard deviations (RGB norm)
MAX_NAME_TOKENS = 32  # a longer `: ... at` span is not read as a name
LABEL_WINDOW = 4  # the label's ':' comes within this many tokens of its first ("defect" "ive" ":" in some tokenizers)
POINTER_SLOPE = 20.0  # pointer logit per unit of cosine similarity at the start: 0.05 closer is e times likelier
GATE_START = 2.0  # the copy's share at the start: sigmoid(2) = 0.88 of the name's probability comes from the demos
# a box's location tokens and position words: sigmoid(4) = 0.98 of their probability from the comparison's box.
# Fixed, not trained: a token likelihood would count a box one bin off as wrong and teach the gate to close.
BOX_GATE = 4.0


@dataclass
class Demo:
    """A defective example: `name`, the token ids after its label's first token up to " at" (`": zorbik"`: the
    rest of its label word, the colon and the name; None when it has no name), and once compared
    with the good bank, `defect`: per compared encoder its DEFECT_CELLS farthest cells `(K, C)`. A graded example:
    `name`, its grade's token ids after `grade:` up to "," or the line's end, and `stats`, its whole-image
    statistics (`grading_kensa_vl.image_statistics`)."""

    name: list[int] | None
    defect: dict[str, torch.Tensor] | None = None
    stats: torch.Tensor | None = None
    box: list[float] | None = None  # the label's box (`label_box`), where the defect is looked for
    region: torch.Tensor | None = None  # its look: `region_descriptor` of its located region, inside its box

    def to(self, device) -> Demo:
        defect = self.defect and {n: c.to(device) for n, c in self.defect.items()}
        moved = [None if t is None else t.to(device) for t in (self.stats, self.region)]
        return Demo(self.name, defect, moved[0], self.box, moved[1])


@dataclass
class Pointer:
    """Where an answer about a compared image starts (`start`: the absolute position of the generation prompt's last
    token in batch row `row`) and what it may copy: the demos' `names`, the pointer `logits` `(n,)` over them and the
    `gate` logit (copy against the language model); the comparison's `box` of the image as its four location token
    ids, and the `position` words of its centre."""

    row: int
    start: int
    names: list[list[int]] = field(default_factory=list)
    logits: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    box: list[int] | None = None
    position: list[int] | None = None  # " the <position> <box>" of the box's centre, as token ids
    graded: bool = False  # `names` are grades: the answer copies "grade: <name>," from its first token
    stats: torch.Tensor | None = None  # a graded query's whole-image statistics (`grading_kensa_vl.image_statistics`)


def read_label(ids: list[int], close: int, config) -> tuple[str | None, list[int] | None]:
    """The label written right after an image whose `</img>` is at position `close` of a row's token `ids`:
    ("good", None), ("defective", its name's token ids or None), ("grade", its grade's token ids or None) or
    (None, None) for anything else (a query, a raw prompt). Needs the config's `good_label_ids`,
    `defective_label_ids` and `name_marks` (":" and " at"), and for grades `grade_word_ids` and `grade_marks`."""
    end = close + 1
    if end >= len(ids) or len(config.name_marks) != 2:
        return None, None
    for word in config.grade_word_ids if len(config.grade_marks) == 2 else []:
        if ids[end : end + len(word) + 1] == word + [config.name_marks[0]]:
            first = end + len(word) + 1
            stop = _name_end(ids, first, config.grade_marks, config)
            return "grade", (ids[first:stop] if stop is not None and stop > first else None)
    if ids[end] in config.good_label_ids:
        return "good", None
    if ids[end] not in config.defective_label_ids:
        return None, None
    colon, at = config.name_marks
    window = ids[end + 1 : end + 1 + LABEL_WINDOW]
    if colon not in window:
        return "defective", None
    first = end + 2 + window.index(colon)
    stop = _name_end(ids, first, [at], config)
    return "defective", (ids[end + 1 : stop] if stop is not None and ids[stop] == at and stop > first else None)


def label_box(ids: list[int], close: int, config) -> list[float] | None:
    """The first box of the label after the image whose `</img>` is at `close` (`<box>` and four location tokens,
    then `</box>`, before the next image or chat turn) as `[x0, y0, x1, y1]` fractions of the image, the covering
    bins' outer edges as `processing_kensa_vl.text_to_boxes` reads them; None without one (or a malformed one)."""
    if len(config.box_token_ids) != 2 or config.loc_token_start_id is None:
        return None
    opening, closing = config.box_token_ids
    stops, bins = {config.image_token_id, *config.summary_stop_token_ids}, config.num_loc_bins
    for i in range(close + 1, len(ids)):
        if ids[i] in stops:
            return None
        if ids[i] == opening:
            loc = [t - config.loc_token_start_id for t in ids[i + 1 : i + 5]]
            ordered = len(loc) == 4 and loc[0] <= loc[2] and loc[1] <= loc[3]
            if ids[i + 5 : i + 6] != [closing] or not ordered or not all(0 <= b < bins for b in loc):
                return None
            return [loc[0] / bins, loc[1] / bins, (loc[2] + 1) / bins, (loc[3] + 1) / bins]
    return None


def _name_end(ids: list[int], first: int, marks, config) -> int | None:
    """Where a name that starts at `first` ends: the position of the first of `marks`, the next image or chat turn
    within MAX_NAME_TOKENS of it; None when there is none (not a name the answer can copy)."""
    stops = {*marks, config.image_token_id, *config.summary_stop_token_ids}
    return next((i for i in range(first, min(first + MAX_NAME_TOKENS + 1, len(ids))) if ids[i] in stops), None)


def prompt_labels(ids: list[int], tiles: list[int], tokens_per_tile: int, config) -> list[tuple]:
    """`read_label` and `label_box` after each image of one prompt (`ids`, whose images have `tiles` tiles of
    `tokens_per_tile` image tokens each, in order): `(role, name, box)`, what `support_bank` takes as `labels`."""
    positions = [i for i, t in enumerate(ids) if t == config.image_token_id]
    ends = [sum(tiles[: k + 1]) * tokens_per_tile - 1 for k in range(len(tiles))]
    if len(positions) != sum(tiles) * tokens_per_tile:
        raise ValueError(f"the prompt holds {len(positions)} image tokens; {tiles} tiles need "
                         f"{sum(tiles) * tokens_per_tile}")  # fmt: skip
    closes = [positions[end] + 1 for end in ends]
    return [(*read_label(ids, close, config), label_box(ids, close, config)) for close in closes]


def box_cells(box: list[float], rows: int, cols: int, side: int) -> torch.Tensor:
    """Which cells of an image's `rows` x `cols` grid tiles (`side` x `side` cells each, row-major as the processor
    cuts them; the grid covers the image) overlap `box` (`[x0, y0, x1, y1]` fractions): `(rows * cols, side, side)`
    bool, at least one cell."""
    x0, y0, x1, y1 = box
    xs, ys = torch.arange(cols * side + 1) / (cols * side), torch.arange(rows * side + 1) / (rows * side)
    across = (xs[:-1] < max(x1, x0 + 1e-6)) & (xs[1:] > x0)
    down = (ys[:-1] < max(y1, y0 + 1e-6)) & (ys[1:] > y0)
    return cut_tiles(down[:, None] & across[None, :], rows, cols)


def within_box(box: list[float], grid, distances: torch.Tensor) -> torch.Tensor:
    """Which of an image's cells (`distances`' shape, `(n, g, g)`: its `grid` tiles, rows and columns, first) overlap
    `box` (`box_cells`): a mask of that shape and dtype, 1 inside, 0 outside and on any other tile."""
    inside = box_cells(box, *grid, distances.shape[-1]).to(distances)
    return torch.cat([inside, inside.new_zeros(distances.shape[0] - len(inside), *inside.shape[1:])])


def cut_tiles(surface: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The map of a whole image `(rows * g, cols * g, ...)` -> its grid tiles' maps `(rows * cols, g, g, ...)`,
    row-major as the processor cuts them (`stitch_tiles` undone)."""
    g, rest = surface.shape[0] // rows, surface.shape[2:]
    return surface.reshape(rows, g, cols, g, *rest).transpose(1, 2).reshape(rows * cols, g, g, *rest)


def farthest_cells(cells: dict[str, torch.Tensor], distances: list[torch.Tensor], selected: torch.Tensor, names,
                   box: list[float] | None = None, grid: tuple[int, int] | None = None):  # fmt: skip
    """An image's DEFECT_CELLS cells farthest from its references, per compared encoder (`names`, in the order of
    `distances`, each `(n, g, g)`), over its `selected` tiles (its `grid` tiles, rows and columns): name -> `(K, C)`.
    With `box`, among the cells that overlap it (`box_cells`)."""
    out = {}
    for name, d in zip(names, distances, strict=True):
        c = cells[name][selected]
        flat = d[selected].flatten().float()
        if box is not None:
            inside = box_cells(box, *grid, d.shape[-1]).flatten().to(flat.device)
            flat = flat.masked_fill(~inside, float("-inf"))
        count = len(flat) if box is None else int(inside.sum())
        out[name] = c.reshape(-1, c.shape[-1])[flat.topk(min(DEFECT_CELLS, count)).indices]
    return out


def region_descriptor(tiles: torch.Tensor, rows: int, cols: int, box: list[float]) -> torch.Tensor:
    """What a region looks like against its surround, from an image's tiles in [0, 1] (`rows` x `cols` grid tiles
    first, as the processor cuts them) and its `box` (`[x0, y0, x1, y1]` fractions): per RGB channel the mean
    inside the box minus the mean in a ring around it (REGION_RING), the same for the standard deviation (texture
    contrast), the log of the box's share of the image and the absolute log of its aspect, then its form
    (`region_form`): `(12,)` float32. Only the tiles under the box and its ring are read."""
    side = tiles.shape[-1]
    h, w = rows * side, cols * side
    x0, y0 = min(int(box[0] * w), w - 1), min(int(box[1] * h), h - 1)
    x1, y1 = max(x0 + 1, min(w, math.ceil(box[2] * w))), max(y0 + 1, min(h, math.ceil(box[3] * h)))
    ring = max(round(REGION_RING * max(x1 - x0, y1 - y0)), math.ceil(0.02 * max(h, w)))
    top, bottom, left, right = max(0, y0 - ring), min(h, y1 + ring), max(0, x0 - ring), min(w, x1 + ring)
    r0, r1, c0, c1 = top // side, -(-bottom // side), left // side, -(-right // side)  # the tiles under them
    grid = tiles[: rows * cols].reshape(rows, cols, 3, side, side)[r0:r1, c0:c1].permute(2, 0, 3, 1, 4)
    window = grid.reshape(3, (r1 - r0) * side, (c1 - c0) * side)
    window = window[:, top - r0 * side : bottom - r0 * side, left - c0 * side : right - c0 * side].float()
    box = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))  # the box within the window; the rest is the ring
    inside = torch.zeros(window.shape[1:], dtype=torch.bool, device=window.device)
    inside[box] = True
    around = ~inside if (~inside).any() else inside  # a box over the whole image has no ring
    (std_in, mean_in), (std_out, mean_out) = (torch.std_mean(window[:, m], 1, correction=0) for m in (inside, around))
    shape = torch.tensor([math.log((x1 - x0) * (y1 - y0) / (h * w)), abs(math.log((x1 - x0) / (y1 - y0)))])
    form = region_form(window, box, inside, around, mean_out, std_out)
    return torch.cat([mean_in - mean_out, std_in - std_out, shape.to(window.device), form])


def region_form(window: torch.Tensor, box: tuple[slice, slice], inside, around, mean: torch.Tensor, std):
    """A region's form, which its colour does not say (a thin line and a blot of the same tint differ here): of the
    box's pixels unlike the surround (FORM_DEVIATION from its `mean` in its `std`, or beyond the box's median when
    more are; its farthest tenth when fewer than 3), their share of the box (fill) and their elongation (1 - the
    square root of their spread's minor over major axis: 0 a disc, 1 a line); the log of the mean edge strength
    (Sobel) in the box over that in the ring; and the edges' coherence in the box (structure tensor: 0 edges every
    way, 1 all along one direction). From the `window` `(3, H, W)`, its `box` (rows, columns) and that box's
    `inside` and `around` (the ring) masks: `(4,)` float32."""
    z = (window[:, box[0], box[1]] - mean[:, None, None]) / (std[:, None, None] + 0.02)
    deviation = z.square().sum(0).sqrt()
    marked = deviation > max(FORM_DEVIATION, deviation.flatten().quantile(0.5).item())
    if marked.sum() < 3:
        marked = deviation >= deviation.flatten().quantile(0.9)
    ys, xs = marked.nonzero(as_tuple=True)
    elongation = torch.zeros((), device=window.device)
    if len(xs) > 2:
        low, high = torch.linalg.eigvalsh(torch.cov(torch.stack([xs, ys]).float())).clamp_min(1e-6)
        elongation = 1 - (low / high).sqrt()
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=window.device)
    grey = F.pad(window.mean(0)[None, None], (1, 1, 1, 1), mode="replicate")
    gx, gy = (F.conv2d(grey, k[None, None])[0, 0] for k in (sobel, sobel.T))
    strength = torch.hypot(gx, gy)
    edge = torch.log((strength[inside].mean() + 1e-4) / (strength[around].mean() + 1e-4))
    xx, yy, xy = (gx * gx)[inside].mean(), (gy * gy)[inside].mean(), (gx * gy)[inside].mean()
    coherence = torch.sqrt((xx - yy) ** 2 + 4 * xy**2) / (xx + yy + 1e-9)
    return torch.stack([marked.float().mean(), elongation, edge, coherence])


def match_similarity(query: dict[str, torch.Tensor], defect: dict[str, torch.Tensor], regions=(None, None)):
    """How near a query's farthest cells lie to a demo's defect: per encoder, each query cell's largest cosine
    similarity to a defect cell, averaged over the cells and the encoders (a scalar); with both `regions` (the
    query's and the demo's `region_descriptor`), minus REGION_SHARE times the distance of their looks in
    REGION_SCALE units and the FORM_COST of each difference of their forms."""
    similarity = torch.stack([(query[n] @ defect[n].T).amax(-1).mean() for n in query]).mean()
    if regions[0] is None or regions[1] is None:
        return similarity
    difference = regions[0] - regions[1].to(regions[0].device)
    look, form = difference[: len(REGION_SCALE)], difference[len(REGION_SCALE) :]
    look_cost = REGION_SHARE * (look * torch.tensor(REGION_SCALE, device=look.device)).norm()
    return similarity - look_cost - (form.abs() * torch.tensor(FORM_COST, device=form.device)).sum()


def continuation(written: list[int] | None, target: list[int]) -> int | None:
    """The next token of `target` after `written`, where `written` is a proper start of it; else None."""
    if written is None or len(written) >= len(target) or target[: len(written)] != written:
        return None
    return target[len(written)]


def after_last(answer: list[int], mark: int) -> list[int] | None:
    """What an answer wrote after its last `mark`; None without one."""
    return answer[len(answer) - answer[::-1].index(mark) :] if mark in answer else None


def name_candidates(answer: list[int], names: list[list[int]], config) -> list[int | None]:
    """For an answer written so far (`answer`: the tokens after the generation prompt), the next token each demo's
    `name` would write after the answer's "defective": None where the answer does not start with it or disagrees
    with that name. After the whole name, its end mark (" at")."""
    if not answer or answer[0] not in config.defective_label_ids:
        return [None] * len(names)
    return [continuation(answer[1:], name + [config.name_marks[1]]) for name in names]


class DemoPointer(nn.Module):
    """The pointer from a query to the defective demos (or the grades) and its gate: `logits = slope * similarity`
    over them (starting at POINTER_SLOPE, or `grading_kensa_vl.GRADE_SLOPE` for `start="grade_pointer"`), and the
    gate from the best similarity and its lead over the second (starting at GATE_START whatever they are)."""

    def __init__(self, start: str = "pointer"):
        super().__init__()
        self.pointer = nn.Linear(1, 1)
        self.gate = nn.Linear(2, 1)
        self.pointer.kensa_init, self.gate.kensa_init = start, "gate"  # see `_init_weights`

    def forward(self, similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(n,)` query-to-demo similarities -> (pointer logits `(n,)`, gate logit)."""
        similarity = similarity.to(self.pointer.weight.dtype)
        best = similarity.topk(min(2, len(similarity))).values
        lead = best[0] - best[1] if len(best) > 1 else torch.zeros_like(best[0])
        return self.pointer(similarity[:, None]).squeeze(-1), self.gate(torch.stack([best[0], lead])).squeeze(-1)


def located_tokens(box: list[float], config) -> tuple[list[int], list[int] | None]:
    """A box `[x0, y0, x1, y1]` in fractions of the image -> (its four location token ids, binned as
    `processing_kensa_vl.boxes_to_text` bins pixels: the first edge's bin, the bin that ends at or after the second;
    the token ids of the position words of its centre, `config.position_token_ids` in the 3x3 order of
    `processing_kensa_vl.POSITIONS`, or None without them)."""
    bins, (x0, y0, x1, y1) = config.num_loc_bins, box
    low = [min(math.floor(v * bins + 1e-9), bins - 1) for v in (x0, y0)]
    high = [min(max(math.ceil(v * bins - 1e-9) - 1, 0), bins - 1) for v in (x1, y1)]
    cell = 3 * min(2, int((y0 + y1) / 2 * 3)) + min(2, int((x0 + x1) / 2 * 3))
    position = config.position_token_ids[cell] if len(config.position_token_ids) == 9 else None
    return [config.loc_token_start_id + b for b in (*low, *high)], position


def grade_candidates(answer: list[int], names: list[list[int]], config) -> list[int | None]:
    """For an answer written so far, the next token of each grade's `grade: <name>,` (`grading_answer`'s opening)
    that agrees with it; None where it disagrees or is complete."""
    opening = config.grade_word_ids[0] + [config.name_marks[0]]
    return [continuation(answer, opening + name + [config.grade_marks[0]]) for name in names]


def copy_terms(pointer: Pointer, answer: list[int], config):
    """At one position of an answer: `(tokens, log copy probabilities, gate logit)`, the candidates and their share
    of the mix (the gate times the pointer's mass on the agreeing demos or grades, renormalised; or the box's next
    position word or location token at BOX_GATE), or None where nothing is copied."""
    candidates = []
    if pointer.names:
        candidates = (grade_candidates if pointer.graded else name_candidates)(answer, pointer.names, config)
    keep = [i for i, c in enumerate(candidates) if c is not None]
    if keep:
        share = torch.log_softmax(pointer.logits[keep].float(), 0) + F.logsigmoid(pointer.gate.float())
        tokens = sorted({candidates[i] for i in keep})  # one token from two names: their shares add
        merged = [share[[j for j, i in enumerate(keep) if candidates[i] == t]].logsumexp(0) for t in tokens]
        return tokens, torch.stack(merged), pointer.gate
    token = None
    if pointer.position and len(config.name_marks) == 2:  # after the name's " at": " the <position> <box>"
        token = continuation(after_last(answer, config.name_marks[1]), pointer.position)
    if token is None and pointer.box and len(config.box_token_ids) == 2:  # after `<box>`: the box, then `</box>`
        opening, closing = config.box_token_ids
        token = continuation(after_last(answer, opening), pointer.box + [closing])
    if token is None:
        return None
    gate = torch.tensor(BOX_GATE)
    return [token], F.logsigmoid(gate)[None], gate


def copy_names(logits: torch.Tensor, history: torch.Tensor, pointers: list[Pointer], base: int, config):
    """The pointer-generator's mix where an answer's name is written: at each such position the next-token
    log-probabilities become `log((1 - g) p_lm + g p_copy)`. `logits` `(batch, P, vocab)` are the last P positions
    of `history` `(batch, L)`, the token ids from absolute position `base` on. Returns log-probabilities there (a
    softmax of them is the mixture) and `logits` elsewhere."""
    first = base + history.shape[1] - logits.shape[1]  # the absolute position of logits[:, 0]
    updates = []
    for pointer in pointers:
        for t in range(max(first, pointer.start), base + history.shape[1]):
            answer = history[pointer.row, pointer.start + 1 - base : t + 1 - base].tolist()
            terms = copy_terms(pointer, answer, config) if pointer.start >= base else None
            if terms is not None:
                updates.append((pointer, t - first, *terms))
    if not updates:
        return logits
    logits = logits.clone()
    for pointer, col, tokens, share, gate in updates:
        lm = torch.log_softmax(logits[pointer.row, col].float(), -1) + F.logsigmoid(-gate.float())
        index = torch.tensor(tokens, device=logits.device)
        lm = lm.index_put((index,), torch.logaddexp(lm[index], share.to(lm.device)))
        logits[pointer.row, col] = lm.to(logits.dtype)
    return logits


class BoxGrammar(LogitsProcessor):
    """Generation writes only well-formed boxes (what `label_box` and `text_to_boxes` read): after `<box>` exactly
    four location tokens, `x0 y0 x1 y1` with `x1 >= x0` and `y1 >= y0`, then `</box>`; outside a box no location token
    and no `</box>`. A language model trained briefly may otherwise open a box and never close it. Applied by
    `KensaVLForConditionalGeneration.generate` after any other processors; where those (top-k, top-p) left no
    allowed token of a row a finite score, its allowed tokens get equal scores."""

    def __init__(self, config):
        self.opening, self.closing = config.box_token_ids
        self.first, self.bins = config.loc_token_start_id, config.num_loc_bins

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length, rows = input_ids.shape[1], torch.arange(len(input_ids), device=input_ids.device)
        opened, closed = (_last(input_ids == token) for token in (self.opening, self.closing))
        inside = opened > closed
        written = (length - 1 - opened).clamp(0, 4)  # tokens written since the row's last `<box>`
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        location = (vocab >= self.first) & (vocab < self.first + self.bins)
        # the second corner's coordinate is at least the first's: x1 (written 2) >= x0, y1 (written 3) >= y0
        corner = input_ids[rows, (opened + written - 1).clamp(0, length - 1)] - self.first
        lowest = torch.where(inside & (written >= 2) & (written < 4), corner, 0)
        in_box = location[None] & (vocab[None] - self.first >= lowest[:, None])
        outside = ~location[None] & (vocab[None] != self.closing)
        allowed = torch.where((inside & (written < 4))[:, None], in_box, outside)
        allowed = torch.where((inside & (written == 4))[:, None], vocab[None] == self.closing, allowed)
        masked = scores.masked_fill(~allowed, -math.inf)
        empty = ~torch.isfinite(masked).any(-1, keepdim=True)  # an earlier warper kept none of the allowed tokens
        return torch.where(empty & allowed, torch.zeros_like(scores), masked)


def _last(mask: torch.Tensor) -> torch.Tensor:
    """Per row of `mask` `(B, L)`, the index of its last True, -1 where none."""
    index = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, index, -1).amax(-1)
