"""Model store: the catalog of named models, pulling them into $INFERD_HOME, resolving `--model` arguments."""

from inferd.store.catalog import CATALOG, CatalogEntry, catalog_names, get_entry
from inferd.store.pull import (
    ModelInfo,
    ResolvedModel,
    StoreError,
    inferd_home,
    list_models,
    pull,
    remove,
    resolve_model,
    verify,
)

__all__ = [
    "CATALOG",
    "CatalogEntry",
    "ModelInfo",
    "ResolvedModel",
    "StoreError",
    "catalog_names",
    "get_entry",
    "inferd_home",
    "list_models",
    "pull",
    "remove",
    "resolve_model",
    "verify",
]
