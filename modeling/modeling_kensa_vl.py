"""KensaVL: a tiled, multi-encoder vision-language model for fine-detail, few-shot inspection.

The model code is split by idea, as sibling files the remote-code loader ships together:
- `configuration_kensa_vl.py`: the config (encoders, fusion, tiling, the comparison's options);
- `vision_kensa_vl.py`: tiles -> visual tokens (towers incl. the weight-free DCT encoder, layer taps and merges,
  S2 scales, pixel shuffle, projector);
- `comparison_kensa_vl.py`: the reference comparison (PatchCore inside the model: the cell bank, the nearest-cell
  search, per-token evidence, the anomaly map and its loss, the summary added after each image), with
  `search_kensa_vl.py` (the search), `locate_kensa_vl.py` (the heatmap and the box), `demos_kensa_vl.py` (what an
  answer copies from the examples) and `grading_kensa_vl.py` (grades);
- this file: the outputs, `KensaVLPreTrainedModel`, `KensaVLModel` (vision + comparison + language model) and
  `KensaVLForConditionalGeneration` (+ LM head), in the order transformers uses.

Image features replace the `<image>` tokens with `masked_scatter`; a count mismatch raises `ValueError`.

Shipped to the Hub as remote code: imports only torch, transformers and siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .comparison_kensa_vl import (
    VERDICT_MARGIN,
    VERDICT_SLOPE,
    KensaVLReferenceComparison,
    ReferenceBank,
    reference_view,
    thumbnail_tiles,
    unit_cells,
)
from .configuration_kensa_vl import KensaVLConfig, encoder_width
from .demos_kensa_vl import GATE_START, POINTER_SLOPE, BoxGrammar, Demo, copy_names
from .grading_kensa_vl import GRADE_SLOPE

# transformers 4.57 loading a local folder copies into its module cache only the relative imports of the file
# `auto_map` names: every sibling is imported here, also one that only a sibling uses
from .locate_kensa_vl import locate_box  # noqa: F401
from .search_kensa_vl import coreset, nearest_distances
from .vision_kensa_vl import (
    KensaVLLayerMerge,
    KensaVLProjector,
    build_towers,
    check_image_grid,
    common_grids,
    encode_tiles,
    project_grids,
    split_by_sample,
    tower_outputs,
)

# transformers 5.2x renamed the cache argument and output field `past_key_values` -> `cache`.
CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_argument(forward):
    """Where the cache is called `cache`, a `past_key_values` argument becomes `cache` with the library's deprecation
    warning, as in its own models; 4.x passes `past_key_values`, which stays."""
    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward) if CACHE_KEY == "cache" else forward


@dataclass
class KensaVLModelOutputWithPast(BaseModelOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None  # (num_tiles, token positions per tile) logits; NaN: no references
    anomaly_loss: torch.FloatTensor | None = None  # with `anomaly_labels`
    image_scores: torch.FloatTensor | None = None  # (num_images, encoders) kNN scores per image; NaN: no references
    # with `return_reference_distances`: per image, the compared encoders' `nearest_distances` maps (None: no
    # references), what `locate_box` boxes
    reference_distances: tuple | None = None
    # with `return_reference_bank`: per sample, the `ReferenceBank` a later image would compare with, what a caller
    # caches and passes back as that sample's `reference_banks` (the support set, encoded once)
    reference_bank: tuple | None = None
    # the compared images' `Summary`s (with their verdict logits), what the head's `set_verdict_odds` reads
    summaries: tuple | None = None


@dataclass
class KensaVLCausalLMOutputWithPast(CausalLMOutputWithPast):
    image_hidden_states: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    anomaly_loss: torch.FloatTensor | None = None  # included in `loss`; computed by the backbone (`model`)
    image_scores: torch.FloatTensor | None = None
    reference_distances: tuple | None = None
    reference_bank: tuple | None = None
    summaries: tuple | None = None
    # the answers' `Pointer`s to the defective demos (`demos_kensa_vl.py`): what generation carries to later steps
    pointers: list | None = None


class KensaVLPreTrainedModel(PreTrainedModel):
    config_class = KensaVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _skip_keys_device_placement = ["past_key_values", "cache"]

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, KensaVLLayerMerge) and hasattr(module, "layer_logits"):
            module.layer_logits.data.zero_()
        # Set per layer, not on the parent: 5.x skips custom-code modules without parameters of their own.
        start = getattr(module, "kensa_init", None)
        if start == "verdict":  # VERDICT_SLOPE * (largest relative score - VERDICT_MARGIN) where there is a level
            module.weight.data.copy_(torch.tensor([[VERDICT_SLOPE, -VERDICT_SLOPE * VERDICT_MARGIN]]))
            module.bias.data.zero_()
        elif start in ("pointer", "grade_pointer", "gate"):  # the pointers' slopes, and a gate that starts open
            module.weight.data.fill_({"pointer": POINTER_SLOPE, "grade_pointer": GRADE_SLOPE}.get(start, 0.0))
            module.bias.data.fill_(GATE_START if start == "gate" else 0.0)
        elif start is not None:
            module.weight.data.fill_(1.0 / module.in_features if start == "mean" else 0.0)
            module.bias.data.zero_()


class KensaVLModel(KensaVLPreTrainedModel):
    """Vision towers + layer merges + projector (+ reference comparison) + language model backbone (no LM head)."""

    def __init__(self, config: KensaVLConfig):
        super().__init__(config)
        if not config.vision_encoders:
            raise ValueError("KensaVLConfig.vision_encoders is empty: a KensaVL model needs at least one encoder.")
        self.vision_towers, no_split, self._tower_kwargs = build_towers(config)
        self.layer_merges = nn.ModuleDict(
            {
                e["name"]: KensaVLLayerMerge(encoder_width(e), len(e["feature_layers"]), e["layer_merge"])
                for e in config.vision_encoders
            }
        )
        self.multi_modal_projector = KensaVLProjector(config)
        if config.reference_comparison:
            self.reference_comparison = KensaVLReferenceComparison(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self._no_split_modules = sorted({*no_split, *(getattr(self.language_model, "_no_split_modules", None) or [])})
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def image_grids(self, pixel_values: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Each encoder's (or each of `names`') merged features on its own patch grid: name -> `(N, g, g, C)`, the
        tiles in chunks of `config.vision_chunk_size`."""
        chunk = self.config.vision_chunk_size or pixel_values.shape[0]
        grids = {}
        for encoder in self.config.vision_encoders:
            name = encoder["name"]
            if names is not None and name not in names:
                continue
            tower, merge = self.vision_towers[name], self.layer_merges[name]
            weight = next(tower.parameters(), None)
            x = pixel_values.to(weight.dtype) if weight is not None else pixel_values
            chunks = [x[i : i + chunk] for i in range(0, len(x), chunk)]
            tile, kwargs = self.config.tile_size, self._tower_kwargs[name]
            grids[name] = torch.cat([encode_tiles(tower, merge, encoder, part, tile, kwargs) for part in chunks])
        return grids

    def project_grids(self, grids: dict[str, torch.Tensor]) -> torch.Tensor:
        """`image_grids` -> visual tokens `(N, tokens_per_tile, D)` in the LM's embedding space."""
        return project_grids(self.multi_modal_projector, grids, self.config)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """Tiles `(N, 3, T, T)` in [0, 1] (`image_grid`, when given, is checked against them) ->
        `pooler_output`: the visual tokens `(N, tokens_per_tile, D)` in the LM's embedding space, what replaces the
        `<image>` tokens; `last_hidden_state`: the encoders' merged features on the common patch grid, concatenated
        along channels, `(N, G^2, C)`; with `output_hidden_states` / `output_attentions`, the transformers towers' own
        (`tower_outputs`: one tuple over the towers in config order)."""
        tile = self.config.tile_size
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, tile, tile):
            raise ValueError(f"pixel_values must be (num_tiles, 3, {tile}, {tile}), got {tuple(pixel_values.shape)}.")
        check_image_grid(image_grid, pixel_values)
        grids = self.image_grids(pixel_values)
        merged = torch.cat([g.flatten(1, 2) for g in common_grids(grids, self.config).values()], dim=-1)
        hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        attn = output_attentions if output_attentions is not None else self.config.output_attentions
        states, maps = tower_outputs(self.vision_towers, self.config, pixel_values, hidden, attn)
        out = BaseModelOutputWithPooling(
            last_hidden_state=merged, pooler_output=self.project_grids(grids), hidden_states=states, attentions=maps
        )
        return out if (return_dict if return_dict is not None else self.config.use_return_dict) else out.to_tuple()

    def reference_cells(
        self, pixel_values: torch.Tensor, features: dict | None = None, views: tuple[str, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """Reference tiles' cells as the comparison's bank, name -> `(cells, C)` per compared encoder: the tiles' own
        L2-normalised cells (`features`, name -> `(n, g, g, C)`, when already encoded), then the same tiles in each
        of `views` (default `config.reference_views`; not for an encoder whose cells a view only moves,
        `view_invariant`), reduced to a greedy k-center `coreset` of `config.reference_coreset` of them (1: every
        cell). Needs no comparison module (the kNN baseline of a plain-ICL model uses it)."""
        if features is None:
            names = self.config.reference_encoder_names()
            features = unit_cells(self.image_grids(pixel_values, names), names)
        views = self.config.reference_views if views is None else views
        parts = {name: [f] for name, f in features.items()}
        turned = [name for name in parts if not getattr(self.vision_towers[name], "view_invariant", False)]
        if views and turned:  # every view in one pass of the encoders: one call per image, not one per view
            seen = self.image_grids(torch.cat([reference_view(pixel_values, view) for view in views]), turned)
            for name, f in unit_cells(seen, turned).items():
                parts[name].append(f)
        cells = {name: torch.cat([f.reshape(-1, f.shape[-1]) for f in fs]) for name, fs in parts.items()}
        return {name: coreset(c, self.config.reference_coreset) for name, c in cells.items()}

    @torch.no_grad()
    def support_bank(self, pixel_values: torch.Tensor, image_grid: torch.Tensor, labels: list | None = None):
        """A support set's `ReferenceBank` without the language model: the compared encoders alone on the images' tiles
        (`image_grid` rows, in order), each good image's cells in every view (`reference_cells`) and its score
        against the good images before it. `labels`, per image, what `read_label` and `label_box` read after it
        in the prompt (`prompt_labels`: role, name, box): a defective one becomes one of the bank's `demos` instead
        (its farthest cells from the good images, within its box); a graded one is also one of its `graded` (its
        whole-image statistics). What a query compares with when the language model reads the supports at a
        smaller tile budget than the comparison needs. A bank small enough for the exact search gives what a
        prompt of these images gives; a larger one builds its approximate-search lists once, over the whole set,
        and searches each image's predecessors in them (`InvertedLists.head`): every later query uses the same
        lists."""
        check_image_grid(image_grid, pixel_values)
        labels = labels or [(None, None, None)] * len(image_grid)
        if len(labels) != len(image_grid):
            raise ValueError(f"labels must give one (role, name, box) per image: {len(image_grid)} images, "
                             f"{len(labels)}")  # fmt: skip
        comparison = self.reference_comparison
        grids = self.image_grids(pixel_values, comparison.encoders)
        features = comparison.features(grids)
        thumbnail = thumbnail_tiles(image_grid)
        starts = [0, *image_grid[:, 2].cumsum(0).tolist()]
        spans = list(zip(starts[:-1], starts[1:], strict=True))
        kept = [i for i, (role, *_) in enumerate(labels) if role != "defective"]  # the good images, in order
        good = [spans[i] for i in kept]
        cells = {name: [] for name in features}
        for first, last in good:
            image = {name: f[first:last] for name, f in features.items()}
            for name, c in self.reference_cells(pixel_values[first:last], image).items():
                cells[name].append(c)
        empty = pixel_values.new_empty(0, dtype=torch.float32)
        bank = ReferenceBank({n: torch.cat(c) if c else empty for n, c in cells.items()}, empty)
        lists = (comparison.bank_lists(bank) or {}) if good else {}
        scores = []
        for index, (first, last) in enumerate(good[1:], start=1):
            image = {name: f[first:last] for name, f in features.items()}
            nearest = []
            for name in comparison.encoders:
                rows = sum(len(c) for c in cells[name][:index])
                if name in lists:
                    earlier, probes = bank.cells[name][:rows], self.config.search_probes
                    found = nearest_distances(image[name], earlier, probes=probes, lists=lists[name].head(rows))
                else:
                    found = comparison.nearest(image[name], bank.cells[name][:rows])
                nearest.append(found)
            grid = image_grid[kept[index], :2].tolist()
            scores.append(comparison(image, thumbnail[first:last], None, nearest=nearest, grid=grid)[4])
        bank.scores = torch.stack(scores) if scores else bank.scores
        for index, ((first, last), (role, name, box)) in enumerate(zip(spans, labels, strict=True)):
            if role == "defective" and good:
                image = {n: f[first:last] for n, f in features.items()}
                found = [comparison.nearest(image[n], bank.cells[n], lists.get(n)) for n in comparison.encoders]
                grid = image_grid[index, :2].tolist()
                found = comparison.with_own(image, found, grid)
                tiles, flags = pixel_values[first:last], thumbnail[first:last]
                bank.demos.append(comparison.shown_demo(name, box, image, found, tiles, flags, grid, bank.levels))
            if role == "grade" and name:
                raw = {n: g[first:last] for n, g in grids.items()}
                bank.graded.append(Demo(name, stats=comparison.statistics(pixel_values[first:last], raw,
                                                                          thumbnail[first:last])))  # fmt: skip
        return bank

    @torch.no_grad()
    def locate(self, pixel_values: torch.Tensor, image_grid: torch.Tensor, bank: ReferenceBank):
        """Where one image differs most from `bank`: `(box, peak)`, the box `[x0, y0, x1, y1]` as fractions of the
        image's width and height, `peak` the largest cell's excess over its encoder's level (`locate_box`, against
        the bank's `levels`). The rule was chosen on KensaSynth's validation split (docs/reference-comparison.md).
        `pixel_values` and `image_grid` hold the one image's tiles as the processor made them."""
        if image_grid.shape[0] != 1 or int(image_grid[0, 2]) != pixel_values.shape[0]:
            raise ValueError(
                f"locate takes one image: image_grid must be (1, 3) and describe all {pixel_values.shape[0]} tiles, "
                f"got {tuple(image_grid.shape)} {image_grid.tolist()}."
            )
        comparison = self.reference_comparison
        grids = self.image_grids(pixel_values, comparison.encoders)
        features = comparison.features(grids)
        lists = comparison.bank_lists(bank) or {}
        distances = [comparison.nearest(features[n], bank.cells[n].float(), lists.get(n)) for n in comparison.encoders]
        grid = image_grid[0, :2].tolist()
        return comparison.locate(comparison.with_own(features, distances, grid), *grid, bank.levels)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features) -> torch.Tensor:
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_tokens, n_features = int(mask.sum()), image_features.shape[0] * image_features.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {n_tokens}, features: {n_features} "
                f"({image_features.shape[0]} tiles x {image_features.shape[1]} tokens per tile)."
            )
        return mask.unsqueeze(-1).expand_as(inputs_embeds)

    @can_return_tuple
    @cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        reference_banks: list[ReferenceBank | None] | None = None,
        anomaly_labels: torch.Tensor | None = None,
        return_reference_distances: bool = False,
        return_reference_bank: bool = False,
        **kwargs,
    ) -> KensaVLModelOutputWithPast:
        """See `KensaVLForConditionalGeneration.forward`; `kwargs` go to the language model."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        check_image_grid(image_grid, pixel_values)
        image_features = compared = anomaly_loss = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            grids = self.image_grids(pixel_values)
            image_features = self.project_grids(grids)
            if self.config.reference_comparison and image_grid is not None and input_ids is not None:
                compared = self.reference_comparison.compare_prompt(
                    image_features,
                    grids,
                    input_ids,
                    image_grid,
                    pixel_values,
                    self.reference_cells,
                    references=reference_banks,
                    keep=return_reference_bank,
                )
                image_features = image_features + compared.token_embeddings
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))
            if compared is not None:
                inputs_embeds = self.reference_comparison.add_summaries(inputs_embeds, input_ids, compared.summaries)
                if anomaly_labels is not None:
                    anomaly_loss = self.reference_comparison.loss(compared.anomaly_map, anomaly_labels)
        elif self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank must run the towers, or ZeRO-3 waits forever for a text-only rank's all-gathers.
            tile = self.config.tile_size
            dummy = self.project_grids(self.image_grids(inputs_embeds.new_zeros(1, 3, tile, tile)))
            inputs_embeds = inputs_embeds + dummy.sum().to(inputs_embeds.dtype) * 0
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KEY: cache if cache is not None else past_key_values},
            **{**kwargs, "return_dict": True},
        )
        return KensaVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            anomaly_map=compared and compared.anomaly_map,
            anomaly_loss=anomaly_loss,
            image_scores=compared and compared.image_scores,
            reference_distances=compared.distances if compared and return_reference_distances else None,
            reference_bank=compared and compared.banks,
            summaries=tuple(compared.summaries) if compared and compared.summaries else None,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY, None)},
        )


class KensaVLForConditionalGeneration(KensaVLPreTrainedModel, GenerationMixin):
    """KensaVL with a language-model head: `model` (backbone) + `lm_head`, the layout TRL and PEFT expect."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: KensaVLConfig):
        super().__init__(config)
        self.model = KensaVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)

        self._no_split_modules = self.model._no_split_modules
        self.post_init()
        # the language model's own head plan (after `post_init`, which builds the plan): a tied head is sharded as
        # its embedding is
        head_plan = getattr(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config.text_config), None), "_tp_plan", None) or {}
        if "lm_head" in head_plan:
            self._tp_plan = {**(self._tp_plan or {}), "lm_head": head_plan["lm_head"]}

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling | tuple:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        reference_banks: list[ReferenceBank | None] | None = None,
        anomaly_labels: torch.Tensor | None = None,
        return_reference_distances: bool = False,
        return_reference_bank: bool = False,
        pointers: list | None = None,
        pointer_history: torch.LongTensor | None = None,
        **kwargs,
    ) -> KensaVLCausalLMOutputWithPast:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_tiles, 3, tile_size, tile_size)`): all tiles of all
                images of the batch, in [0, 1], as the processor returns them.
            image_grid (`torch.LongTensor` of shape `(num_images, 3)`): rows, cols and tiles per image (checked).
            labels (`torch.LongTensor` of shape `(batch, seq)`): next-token targets, -100 where ignored.
            cache: the KV cache under the name recent 5.x `generate` passes a caller's cache by (else
                `past_key_values`).
            reference_banks (`list[ReferenceBank]`, *optional*): per sample, the bank of support images already in
                the KV cache (with `reference_comparison`): what `return_reference_bank` returned for them.
            anomaly_labels (`torch.FloatTensor` of shape `(num_tiles, tokens_per_tile)`, *optional*): 1 where a
                visual token covers a defect, 0 where it does not, -1 where unknown (the processor's
                `anomaly_labels`). With `reference_comparison`, their class-balanced binary cross-entropy against
                the anomaly map, times `config.anomaly_loss_weight`, is added to the loss.
            return_reference_distances (`bool`, *optional*): also return, per image, the compared encoders'
                nearest-reference cell distances (`reference_distances`; what `locate_box` boxes, so a caller need
                not compare the image again).
            return_reference_bank (`bool`, *optional*): also return, per sample, its images' cells as the bank a
                later image compares with (`reference_bank`: a `ReferenceBank` per sample, without encoding the
                images again).
            pointers (`list[Pointer]`, *optional*): an earlier step's `pointers` (generation passes them on), for
                answers whose prompt this call does not compare again; with `pointer_history`, every token id so far
                (generation passes them), from which the name written so far is read.
            kwargs: passed to the language model (attention outputs, flash-attention arguments) and the loss
                (`num_items_in_batch`).
        """
        cached = cache if cache is not None else past_key_values
        past = cached.get_seq_length() if cached is not None and hasattr(cached, "get_seq_length") else 0
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid=image_grid,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache if cache is not None else past_key_values,
            reference_banks=reference_banks,
            anomaly_labels=anomaly_labels,
            return_reference_distances=return_reference_distances,
            return_reference_bank=return_reference_bank,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        if outputs.summaries and not isinstance(logits_to_keep, torch.Tensor):
            comparison = self.model.reference_comparison
            logits = comparison.set_verdict_odds(logits, input_ids, list(outputs.summaries))
            pointers = comparison.pointers(input_ids, list(outputs.summaries), past) or pointers
        if pointers and input_ids is not None and not isinstance(logits_to_keep, torch.Tensor):
            history, base = (pointer_history, 0) if pointer_history is not None else (input_ids, past)
            logits = copy_names(logits, history, pointers, base, self.config)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        anomaly_loss = outputs.anomaly_loss
        if anomaly_loss is not None:
            loss = anomaly_loss if loss is None else loss + anomaly_loss
        return KensaVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            anomaly_map=outputs.anomaly_map,
            anomaly_loss=anomaly_loss,
            image_scores=outputs.image_scores,
            reference_distances=outputs.reference_distances,
            reference_bank=outputs.reference_bank,
            summaries=outputs.summaries,
            pointers=pointers or None,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY, None)},
        )

    def generate(self, *args, logits_processor=None, **kwargs):
        """`GenerationMixin.generate`, every box it writes well formed (`BoxGrammar`, when the config has box
        tokens), after the caller's `logits_processor`s."""
        if len(self.config.box_token_ids) == 2 and self.config.loc_token_start_id is not None:
            logits_processor = LogitsProcessorList([*(logits_processor or []), BoxGrammar(self.config)])
        return super().generate(*args, logits_processor=logits_processor, **kwargs)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Carry the answers' `pointers` from the prefill to every decoding step (they point into the prompt)."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "pointers", None):
            model_kwargs["pointers"] = outputs.pointers
        return model_kwargs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None,
                                      **model_kwargs):  # fmt: skip
        """Beam search and `num_return_sequences` repeat each sample `expand_size` times. The library repeats every
        tensor row by row, but `pixel_values` and `image_grid` hold all tiles and images of the batch in one flat
        list: repeat each sample's own tiles and images instead (and its cached support bank)."""
        pixel_values, image_grid = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_grid", None)
        banks = model_kwargs.pop("reference_banks", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(  # a static method in 4.x
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if expand_size > 1 and pixel_values is not None and image_grid is not None:
            samples = split_by_sample(input_ids[::expand_size], pixel_values, image_grid, self.config)
            pixel_values = torch.cat([tiles for tiles, _ in samples for _ in range(expand_size)])
            image_grid = torch.cat([grid for _, grid in samples for _ in range(expand_size)])
        if banks is not None:
            banks = [bank for bank in banks for _ in range(expand_size)]
        extra = {"pixel_values": pixel_values, "image_grid": image_grid, "reference_banks": banks}
        return input_ids, {**model_kwargs, **{k: v for k, v in extra.items() if v is not None}}

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_grid=None, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        # Pixels go with the steps whose tokens hold the image placeholders: the prefill, every step without a cache.
        # Not a decode step, nor the candidate tokens assisted decoding verifies (several tokens, no image).
        step_ids = model_inputs.get("input_ids")
        if step_ids is not None:
            needs_pixels = bool((step_ids == self.config.image_token_id).any())
        else:  # inputs_embeds: 5.x flags the prefill; 4.x re-sends pixels every step
            needs_pixels = bool(kwargs.get("is_first_iteration", True))
        if needs_pixels:
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_grid"] = image_grid
        if kwargs.get("pointers"):  # a name is copied from what was written so far: every token id
            model_inputs["pointer_history"] = input_ids
        return model_inputs


__all__ = ["KensaVLConfig", "KensaVLModel", "KensaVLForConditionalGeneration", "KensaVLPreTrainedModel"]
