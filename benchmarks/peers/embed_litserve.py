"""LitServe + sentence-transformers with LitServe's OpenAI embedding spec (a peer of benchmarks/embeddings.py).

    python benchmarks/peers/embed_litserve.py MODEL_DIR [--port 8000] [--max-batch-size 32] [--batch-timeout 0.005]

LitServe's dynamic batching (max_batch_size > 1) takes one input per request only (its spec answers 400 for a
list otherwise), so requests of 32 sentences need a server with --max-batch-size 1.
"""

from __future__ import annotations

import argparse

import litserve as ls
from litserve.specs import OpenAIEmbeddingSpec
from sentence_transformers import SentenceTransformer


class EmbedAPI(ls.LitAPI):
    def __init__(self, model_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device) -> None:
        self.model = SentenceTransformer(self.model_dir, device="cpu")

    def predict(self, inputs):
        # batched: one text (or a one-text list) per request; unbatched: the request's list of texts
        texts = [t[0] if isinstance(t, list) else t for t in inputs] if isinstance(inputs, list) else [inputs]
        return self.model.encode(texts, batch_size=32, convert_to_numpy=True).tolist()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005)
    args = parser.parse_args()
    api = EmbedAPI(args.model_dir, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    ls.LitServer(api, spec=OpenAIEmbeddingSpec(), accelerator="cpu", workers_per_device=1).run(
        port=args.port, generate_client_file=False
    )
