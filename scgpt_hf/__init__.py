"""scgpt-hf: the scGPT single-cell foundation model as a Hugging Face model family."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .configuration_scgpt import ScGPTConfig
from .convert import ConversionReport, convert_original_checkpoint
from .data import CellDataset, DomainGroupedSampler, DomainGroupedTrainer, MultiOmicCellDataset, ScGPTDataCollator
from .embedding import annotate, embed
from .perturbation import PerturbationDataset, predict_perturbation
from .pretraining import StreamingCellDataset, build_vocab, make_tokenizer, pretrain
from .gene_networks import (
    attention_gene_scores,
    gene_embeddings,
    gene_programs,
    gene_similarity_network,
    most_similar_genes,
)
from .modeling_scgpt import (
    ScGPTForBatchIntegration,
    ScGPTForBatchIntegrationOutput,
    ScGPTForCellClassification,
    ScGPTForCellClassificationOutput,
    ScGPTForMultiOmicIntegration,
    ScGPTForPerturbationPrediction,
    ScGPTForPerturbationPredictionOutput,
    ScGPTForPreTraining,
    ScGPTForPreTrainingOutput,
    ScGPTModel,
    ScGPTModelOutput,
    ScGPTPreTrainedModel,
)
from .tokenization_scgpt import GeneMatch, ScGPTTokenizer

__version__ = "0.1.0"

AutoConfig.register(ScGPTConfig.model_type, ScGPTConfig)
AutoModel.register(ScGPTConfig, ScGPTModel)
AutoModelForPreTraining.register(ScGPTConfig, ScGPTForPreTraining)
AutoModelForSequenceClassification.register(ScGPTConfig, ScGPTForCellClassification)
AutoTokenizer.register(ScGPTConfig, tokenizer_class=ScGPTTokenizer)

__all__ = [
    "CellDataset",
    "ConversionReport",
    "DomainGroupedSampler",
    "DomainGroupedTrainer",
    "GeneMatch",
    "MultiOmicCellDataset",
    "PerturbationDataset",
    "ScGPTConfig",
    "ScGPTDataCollator",
    "ScGPTForBatchIntegration",
    "ScGPTForBatchIntegrationOutput",
    "ScGPTForCellClassification",
    "ScGPTForCellClassificationOutput",
    "ScGPTForMultiOmicIntegration",
    "ScGPTForPerturbationPrediction",
    "ScGPTForPerturbationPredictionOutput",
    "ScGPTForPreTraining",
    "ScGPTForPreTrainingOutput",
    "ScGPTModel",
    "ScGPTModelOutput",
    "ScGPTPreTrainedModel",
    "ScGPTTokenizer",
    "StreamingCellDataset",
    "annotate",
    "attention_gene_scores",
    "build_vocab",
    "convert_original_checkpoint",
    "embed",
    "gene_embeddings",
    "gene_programs",
    "gene_similarity_network",
    "make_tokenizer",
    "most_similar_genes",
    "predict_perturbation",
    "pretrain",
]

# Saved folders carry the configuration, tokenizer and modeling code plus an auto_map, so a pushed model
# loads with trust_remote_code=True where scgpt_hf is not installed.
from .hub import register_remote_code  # noqa: E402

register_remote_code()
