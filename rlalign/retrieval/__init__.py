"""Retrieval: a FAISS vector index, the index HTTP service and its client.

Names are re-exported lazily, so importing one piece (say the index) does not pull in the optional
dependencies of another (fastapi/uvicorn for the service, httpx for the client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlalign.retrieval.client import IndexClient, IndexServiceError
    from rlalign.retrieval.index import IndexConfig, IndexMetadataError, VectorIndex, recall_at_k
    from rlalign.retrieval.service import ServiceConfig, ServiceHandle, serve, start_in_thread

_EXPORTS = {
    "IndexConfig": "rlalign.retrieval.index",
    "IndexMetadataError": "rlalign.retrieval.index",
    "VectorIndex": "rlalign.retrieval.index",
    "recall_at_k": "rlalign.retrieval.index",
    "ServiceConfig": "rlalign.retrieval.service",
    "ServiceHandle": "rlalign.retrieval.service",
    "serve": "rlalign.retrieval.service",
    "start_in_thread": "rlalign.retrieval.service",
    "IndexClient": "rlalign.retrieval.client",
    "IndexServiceError": "rlalign.retrieval.client",
}
__all__ = [
    "IndexClient",
    "IndexConfig",
    "IndexMetadataError",
    "IndexServiceError",
    "ServiceConfig",
    "ServiceHandle",
    "VectorIndex",
    "recall_at_k",
    "serve",
    "start_in_thread",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlalign.retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
