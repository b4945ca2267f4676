"""Layer 4: embedding models (BERT-family encoders): the sync model, the offline `Embedder` API and the served
`AsyncEmbedEngine` (kind embed) with token-budget micro-batching."""

from inferd.embeddings.async_engine import AsyncEmbedEngine, EmbedEngineStats, EmbedOptions
from inferd.embeddings.embedder import Embedder
from inferd.embeddings.model import EmbeddingModel
from inferd.embeddings.tokenizer import EmbedTokenizer

__all__ = ["AsyncEmbedEngine", "EmbedEngineStats", "EmbedOptions", "Embedder", "EmbeddingModel", "EmbedTokenizer"]
