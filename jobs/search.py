"""``vaepipe search``: the nearest stored rows of an image or a key, and a picture of them."""
from __future__ import annotations

import numpy as np

from jobs.grid import save_grid
from pipeline.index import Hit, open_index
from pipeline.query import stored_images
from vae_model.storage import StorageOptions, read_bytes


def search(index_url: str, image: str | None = None, key: str | None = None, k: int = 10,
           checkpoint: str | None = None, grid: str | None = None,
           storage_options: StorageOptions = None, ef_search: int | None = None,
           nprobe: int | None = None) -> list[Hit]:
    """Query the index at ``index_url`` with an image file/URL (encoded with the index's model) or a
    stored row's key (that row comes first); with ``grid``, write the query and its neighbours as a PNG.
    ``ef_search`` (hnsw) / ``nprobe`` (ivf): this query's search effort instead of the index's stored one."""
    if (image is None) == (key is None):
        raise ValueError("give one of an image or a key")
    index = open_index(index_url, checkpoint, storage_options)
    if ef_search is not None:
        index.index.ef_search = ef_search
    if nprobe is not None:
        index.index.nprobe = nprobe
    if key is not None:
        hits = index.search_key(key, k)
    else:
        data = read_bytes(image, storage_options)
        hits = index.search([data], k)[0]
    if grid:
        shape = index.meta.get("image") or {}
        if key is not None:
            query = stored_images(hits[:1], shape["channels"], shape["size"], storage_options)[0]
            neighbours = [h for h in hits if h.key != key]
        else:
            query, neighbours = index.pixels([data])[0], hits
        pictures = [query, *stored_images(neighbours, shape["channels"], shape["size"], storage_options)]
        save_grid(np.stack(pictures), grid, nrow=len(pictures), storage_options=storage_options)
    return hits
