"""transformers' `ModelTesterMixin` on `KensaVLModel` and `KensaVLForConditionalGeneration`, as a model inside the
library is tested: a tiny config, two images per sample (Qwen2-VL-style flat `pixel_values` + `image_grid`), labels
equal to the input ids. The mixin's file comes from the installed version's source distribution (`library.py`)."""

from __future__ import annotations

import unittest
from unittest import mock

import pytest
import torch

from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig
from kensa_vl.modeling.modeling_kensa_vl import KensaVLForConditionalGeneration, KensaVLModel

from .library import library

try:
    common = library("test_modeling_common")
except Exception as error:  # noqa: BLE001 - no network, no pip, a changed archive: all mean "cannot run here"
    pytest.skip(f"transformers' common model tests cannot be had: {error}", allow_module_level=True)

IMAGE_TOKEN_ID = 3
_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 14, "image_size": 56}


class KensaVLModelTester:
    def __init__(self, parent, batch_size=2, text_tokens=7, images_per_sample=2, is_training=True):
        self.parent, self.batch_size, self.is_training = parent, batch_size, is_training
        self.images_per_sample, self.text_tokens = images_per_sample, text_tokens
        self.tile_size, self.vocab_size = 56, 99
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        config = self.get_config()
        self.tokens_per_image = config.tokens_per_tile  # one tile per image
        self.seq_length = self.images_per_sample * self.tokens_per_image + self.text_tokens

    def get_config(self) -> KensaVLConfig:
        text = {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        encoders = [
            {"name": "siglip", "config": {"model_type": "siglip_vision_model", "intermediate_size": 37, **_VIT}},
            {"name": "dinov2", "config": {"model_type": "dinov2", "mlp_ratio": 2, **_VIT}, "feature_layers": [-2, -1]},
        ]
        return KensaVLConfig(
            text_config=text,
            vision_encoders=encoders,
            tile_size=self.tile_size,
            max_tiles=1,
            image_token_id=IMAGE_TOKEN_ID,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        images = self.batch_size * self.images_per_sample
        text = torch.randint(4, self.vocab_size, (self.batch_size, self.text_tokens))
        image = torch.full((self.batch_size, self.tokens_per_image), IMAGE_TOKEN_ID)
        pieces = text.tensor_split(self.images_per_sample, dim=1)  # the text after each image
        input_ids = torch.cat([part for piece in pieces for part in (image, piece)], dim=1)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.rand(images, 3, self.tile_size, self.tile_size),
            "image_grid": torch.tensor([[1, 1, 1]] * images),
        }
        return config, inputs


class KensaVLModelTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (KensaVLModel, KensaVLForConditionalGeneration)
    # `GenerationTesterMixin` is not in the source distribution: `tests/test_generation.py` covers its behaviours
    all_generative_model_classes = ()
    _is_composite = True
    # several encoders of different widths: no one vision `hidden_size` to compare `last_hidden_state` with (its
    # width, the encoders' merged channels, is checked in `tests/test_model.py`)
    skip_test_image_features_output_shape = True

    def setUp(self):
        self.model_tester = KensaVLModelTester(self)

    # Training runs only the model with a head: the base model has no loss, and the mixin skips the library's own
    # base models by their names, which a model outside the library does not have.
    def test_training(self):
        with mock.patch.object(self, "all_model_classes", (KensaVLForConditionalGeneration,)):
            super().test_training()

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        with mock.patch.object(self, "all_model_classes", (KensaVLForConditionalGeneration,)):
            super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    @unittest.skip("two towers: hidden states are one tuple over both; KensaVLOneTowerImageFeaturesTest counts them")
    def test_get_image_features_hidden_states(self):
        pass

    @unittest.skip("two towers: attentions are one tuple over both; KensaVLOneTowerImageFeaturesTest counts them")
    def test_get_image_features_attentions(self):
        pass

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is KensaVLForConditionalGeneration:
            inputs["labels"] = inputs["input_ids"].clone()
        return inputs


class OneTowerTester(KensaVLModelTester):
    """One transformers tower (SigLIP-like) beside the weight-free DCT encoder: the mixin's layer counts apply."""

    vision_config = {"num_hidden_layers": _VIT["num_hidden_layers"]}

    def get_config(self) -> KensaVLConfig:
        config = super().get_config().to_dict()
        dct = {"model_type": "kensa_dct", "patch_size": 7, "luma_coefficients": 10, "chroma_coefficients": 3}
        config["vision_encoders"] = [config["vision_encoders"][0], {"name": "dct", "config": dct}]
        return KensaVLConfig(**config)


class KensaVLOneTowerImageFeaturesTest(unittest.TestCase):
    """The mixin's `get_image_features` hidden-state and attention tests on a one-tower model."""

    all_model_classes = (KensaVLModel, KensaVLForConditionalGeneration)
    has_attentions = True
    mixin = common.ModelTesterMixin
    _image_features_prepare_config_and_inputs = mixin._image_features_prepare_config_and_inputs
    _image_features_get_expected_num_attentions = mixin._image_features_get_expected_num_attentions
    _image_features_get_expected_num_hidden_states = mixin._image_features_get_expected_num_hidden_states
    _check_features_ignore_output_hidden_states = mixin._check_features_ignore_output_hidden_states
    test_get_image_features_hidden_states = mixin.test_get_image_features_hidden_states
    test_get_image_features_attentions = mixin.test_get_image_features_attentions

    def setUp(self):
        self.model_tester = OneTowerTester(self)
