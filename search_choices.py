"""The names of the search engines the scripts offer, and the folder-gallery cache's default place, in a
module without torch.

The scripts' parsers need these names to build ``--retrieval_engine`` and ``--ann``; keeping them here
rather than beside the engines (which import torch and faiss) lets ``--help`` and argument errors answer
at once.

* :data:`ENGINES`: exact search engines of :mod:`retrieval` (faiss, torch, or auto: faiss when installed);
* :data:`ANN_KINDS`: approximate faiss indexes of :mod:`ann` (HNSW, IVF-PQ);
* :data:`FOLDER_CACHE_DIR`: where ``retrieve.py`` and the retrieval page cache a folder's gallery features
  (:class:`feature_cache.FolderGalleryCache`), so either finds the other's entries.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["ENGINES", "ENGINE_HELP", "ANN_KINDS", "FOLDER_CACHE_DIR"]

ENGINES = ("auto", "faiss", "torch")
ENGINE_HELP = "exact search engine: faiss, torch, or auto (faiss when installed, else torch); the rankings are identical"
ANN_KINDS = ("hnsw", "ivfpq")
FOLDER_CACHE_DIR = Path.home() / ".cache" / "ssn_cir"
