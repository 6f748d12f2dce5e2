"""Atlas scale: embed millions of cells from .h5ad files, AnnData zarr stores and TileDB-SOMA experiments into
a resumable zarr embedding store, in one process or many (``torchrun``).

* `open_sources` / `SourceOptions` / `CellSource` (`scgpt_hf.atlas.sources`): the inputs behind one interface;
* `EmbeddingStore` (`scgpt_hf.atlas.store`): the output, readable with ``anndata.read_zarr``;
* `embed_to_store` (`scgpt_hf.atlas.run`): the run, sharded over processes and resumable.
"""

from __future__ import annotations

from .run import embed_to_store, weights_sha256
from .sources import CellSource, SourceError, SourceOptions, open_source, open_sources
from .store import EmbeddingStore, SettingsMismatchError, StoreBusyError

__all__ = [
    "CellSource",
    "EmbeddingStore",
    "SettingsMismatchError",
    "SourceError",
    "SourceOptions",
    "StoreBusyError",
    "embed_to_store",
    "open_source",
    "open_sources",
    "weights_sha256",
]
