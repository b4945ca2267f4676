"""Layer 4: persistent vector collections (similarity search beside the embedding engine).

    CollectionStore(root)            every collection under $INFERD_HOME/collections, loaded at construction
    store.create(name, dimension=, metric=, model=)   -> Collection
    collection.upsert([Item(id, vector, metadata, text)]) / delete(ids) / get(id)
    collection.query(vector | id=, k=, filter=, exclude=) -> [QueryResult(id, score, metadata)] best first

Text is embedded by the caller (the server's route, with the collection's embedding model): this package never
imports an engine. The index library (usearch) is imported only by `index.py`, lazily.
"""

from inferd.collections.collection import (
    Collection,
    CollectionConfig,
    CollectionError,
    CollectionStore,
    ConflictError,
    InvalidRequestError,
    Item,
    NotFoundError,
    QueryResult,
    collections_root,
)

__all__ = [
    "Collection",
    "CollectionConfig",
    "CollectionError",
    "CollectionStore",
    "ConflictError",
    "InvalidRequestError",
    "Item",
    "NotFoundError",
    "QueryResult",
    "collections_root",
]
