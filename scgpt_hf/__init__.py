"""scgpt-hf: the scGPT single-cell foundation model as a Hugging Face model family.

Importing the package is light: each public name loads its module (and torch, transformers, anndata) on first
use, and the Auto classes resolve to the scGPT classes once transformers loads them (see `lazy_imports`).
"""

from typing import TYPE_CHECKING

from .lazy_imports import install_auto_registration, lazy_exports

__version__ = "0.1.0"

# submodule -> the public names it holds
_EXPORTS = {
    "configuration_scgpt": ["ScGPTConfig"],
    "convert": ["ConversionReport", "convert_original_checkpoint"],
    "data": ["CellDataset", "DomainGroupedSampler", "DomainGroupedTrainer", "MultiOmicCellDataset",
             "ScGPTDataCollator"],
    "embedding": ["annotate", "embed"],
    "gene_networks": ["attention_gene_scores", "gene_embeddings", "gene_programs", "gene_similarity_network",
                      "most_similar_genes"],
    "modeling_scgpt": ["ScGPTForBatchIntegration", "ScGPTForBatchIntegrationOutput", "ScGPTForCellClassification",
                       "ScGPTForCellClassificationOutput", "ScGPTForMultiOmicIntegration",
                       "ScGPTForPerturbationPrediction", "ScGPTForPerturbationPredictionOutput",
                       "ScGPTForPreTraining", "ScGPTForPreTrainingOutput", "ScGPTModel", "ScGPTModelOutput",
                       "ScGPTPreTrainedModel"],
    "perturbation": ["PerturbationDataset", "predict_perturbation"],
    "pretraining": ["StreamingCellDataset", "build_vocab", "make_tokenizer", "pretrain"],
    "tokenization_scgpt": ["GeneMatch", "ScGPTTokenizer"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .configuration_scgpt import ScGPTConfig
    from .convert import ConversionReport, convert_original_checkpoint
    from .data import CellDataset, DomainGroupedSampler, DomainGroupedTrainer, MultiOmicCellDataset, ScGPTDataCollator
    from .embedding import annotate, embed
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
    from .perturbation import PerturbationDataset, predict_perturbation
    from .pretraining import StreamingCellDataset, build_vocab, make_tokenizer, pretrain
    from .tokenization_scgpt import GeneMatch, ScGPTTokenizer

# AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification and AutoTokenizer resolve
# to the scGPT classes, and saved folders carry the code and an auto_map (loadable with trust_remote_code=True
# where scgpt_hf is not installed).
install_auto_registration()
