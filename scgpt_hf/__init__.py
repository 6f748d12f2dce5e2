"""scgpt-hf: the scGPT single-cell foundation model as a Hugging Face model family."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_scgpt import ScGPTConfig
from .modeling_scgpt import (
    ScGPTForPreTraining,
    ScGPTForPreTrainingOutput,
    ScGPTModel,
    ScGPTModelOutput,
    ScGPTPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(ScGPTConfig.model_type, ScGPTConfig)
AutoModel.register(ScGPTConfig, ScGPTModel)
AutoModelForPreTraining.register(ScGPTConfig, ScGPTForPreTraining)

__all__ = [
    "ScGPTConfig",
    "ScGPTForPreTraining",
    "ScGPTForPreTrainingOutput",
    "ScGPTModel",
    "ScGPTModelOutput",
    "ScGPTPreTrainedModel",
]
