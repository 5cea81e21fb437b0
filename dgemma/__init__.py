"""dgemma: a fast, hackable runtime for DiffusionGemma block-diffusion language models.

    model = dgemma.load("path/or/hub-id")
    result = model.generate([[2, 651, 1234]], max_new_tokens=64, seed=0)
"""

from .api import Model, TextResult, load
from .config import GenerationSettings, ModelConfig
from .engine.generate import GenerationResult, StepEvent
from .engine.prefix import PrefixCache

__all__ = ["load", "Model", "TextResult", "ModelConfig", "GenerationSettings", "GenerationResult", "StepEvent",
           "PrefixCache"]
__version__ = "0.1.0"
