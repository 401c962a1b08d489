"""KensaSynth (offline inspection data) and the adapters that turn datasets into training conversations.

What `kensa_vl.eval` may use of the training side is exported here and nowhere else: the inspection episode's
prompt (`episode`), KensaSynth's loader (`load_synth`) and its material names (`MATERIALS`).
"""

from .conversations import episode
from .materials import MATERIALS
from .synth import load_synth

__all__ = ["MATERIALS", "episode", "load_synth"]
