"""transformers' `ProcessorTesterMixin`, `ImageProcessingTestMixin` and `ConfigTester` on KensaVL's processor, image
processor and config, with the mixins' files from the installed version's source distribution (`library.py`)."""

from __future__ import annotations

import unittest
from unittest import mock

import pytest
from transformers import AutoImageProcessor

from kensa_vl.modeling.configuration_kensa_vl import KensaVLConfig
from kensa_vl.processing.image_processing_kensa_vl import KensaVLImageProcessor
from kensa_vl.processing.processing_kensa_vl import DEFAULT_CHAT_TEMPLATE, KensaVLProcessor

from .library import library
from .test_kensa_vl_modeling import KensaVLModelTester

try:
    processing = library("test_processing_common")
    image_processing = library("test_image_processing_common")
    configuration = library("test_configuration_common")
except Exception as error:  # noqa: BLE001 - no network, no pip, a changed archive: all mean "cannot run here"
    pytest.skip(f"transformers' common processor tests cannot be had: {error}", allow_module_level=True)

TILE = 56
# The mixins reload what they save through the Auto classes, which find a class outside the library by the name in
# `preprocessor_config.json` once it is registered (a saved model folder finds it through `auto_map` instead).
AutoImageProcessor.register(KensaVLConfig, slow_image_processor_class=KensaVLImageProcessor, exist_ok=True)


class KensaVLProcessorTest(processing.ProcessorTesterMixin, unittest.TestCase):
    processor_class = KensaVLProcessor

    def setUp(self):
        super().setUp()
        # Saving a model folder (`save_kensa`, in earlier tests) registers the classes for the Auto classes, a
        # class-wide setting under which every later save writes `auto_map`: test the processor unregistered, as
        # the mixin expects of a library processor.
        for cls in (KensaVLProcessor, KensaVLImageProcessor):
            patcher = mock.patch.object(cls, "_auto_class", None)
            patcher.start()
            self.addCleanup(patcher.stop)

    @classmethod
    def _setup_tokenizer(cls):
        from kensa_vl.train.build import train_tokenizer

        return train_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return KensaVLImageProcessor(tile_size=TILE, max_tiles=1)  # one tile per image, as the mixin counts

    @staticmethod
    def prepare_processor_dict():
        return {"image_seq_len": 4, "chat_template": DEFAULT_CHAT_TEMPLATE}


class KensaVLImageProcessingTester(image_processing.ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        # one tile per image, no thumbnail: the mixin's (batch, C, H, W) shapes hold
        super().__init__(parent, tile_size=TILE, max_tiles=1, size={"height": TILE, "width": TILE}, **kwargs)

    def _get_image_processing_classes(self):
        return {"pil": KensaVLImageProcessor}  # not in the library's registry: its only backend, PIL


class KensaVLImageProcessingTest(image_processing.ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = KensaVLImageProcessingTester

    @unittest.skip("the tiles are RGB: the encoders are RGB models, a fourth channel is composited onto white")
    def test_call_numpy_4_channels(self):
        pass

    @unittest.skip("the library's rule for its own new models; torchvision is not installed with KensaVL")
    def test_new_models_require_torchvision_backend(self):
        pass


class KensaVLConfigTest(unittest.TestCase):
    def setUp(self):
        # scalar options away from their defaults; the encoder list and the text config are filled in with their
        # defaults when saved, so they are not compared key by key (the model tests load and save them)
        kwargs = {"tile_size": 56, "max_tiles": 3, "pixel_shuffle": 1, "fusion": "interleave", "image_token_id": 5}
        self.model_tester = KensaVLModelTester(self)  # a full config, for the composite-config checks
        self.config_tester = configuration.ConfigTester(self, config_class=KensaVLConfig, has_text_modality=False,
                                                        **kwargs)  # fmt: skip

    def test_config(self):
        self.config_tester.run_common_tests()
