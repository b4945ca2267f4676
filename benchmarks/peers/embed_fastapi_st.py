"""A FastAPI + sentence-transformers embeddings server written the plain way (the peer of benchmarks/embeddings.py):
one OpenAI-shaped POST /v1/embeddings that calls `SentenceTransformer.encode` on the request's texts in FastAPI's
thread pool; no batching across requests.

    python benchmarks/peers/embed_fastapi_st.py MODEL_DIR [--port 8000]
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer


class Body(BaseModel):
    model: str | None = None
    input: str | list[str]


def build_app(model_dir: str) -> FastAPI:
    model = SentenceTransformer(model_dir, device="cpu")
    app = FastAPI()

    @app.post("/v1/embeddings")
    def embeddings(body: Body) -> dict:
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = model.encode(texts, batch_size=32, convert_to_numpy=True)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
            "model": body.model,
        }

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(build_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")
