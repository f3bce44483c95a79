"""ddkit.data: real datasets as uint8 tensors, fetched, verified and cached.

Public API::

    from ddkit.data import (RealDataset, Split, load_dataset, fetch_dataset, dataset_info,
                            check_available, list_datasets, data_root, DATASETS)

* :func:`list_datasets` - ``[(name, one-line description)]``.
* :func:`fetch_dataset` - download/import a dataset into ``data_root()/<name>/`` (verified).
* :func:`load_dataset` - a :class:`RealDataset` whose splits hold ``uint8 [N, C, H, W]`` images
  and ``int64 [N]`` labels; ``mean``/``std`` are per channel in ``[0, 1]`` pixel units.
* :func:`dataset_info` - shapes, counts, class names, normalisation, without keeping tensors.
* :func:`check_available` - the error :func:`load_dataset` would raise for data not fetched yet,
  without reading images.
* :func:`data_root` - ``$DDKIT_DATA`` or ``~/.cache/ddkit``.
* :data:`DATASETS` - the static :class:`~ddkit.data.registry.DatasetSpec` table.

User errors raise :class:`ddkit.errors.DDKitError` with a one-line message.
"""

from ddkit.data.core import RealDataset, Split, data_root
from ddkit.data.fetch import fetch_dataset
from ddkit.data.loading import check_available, dataset_info, load_dataset
from ddkit.data.registry import DATASETS, DatasetSpec, list_datasets

__all__ = [
    "RealDataset",
    "Split",
    "load_dataset",
    "fetch_dataset",
    "dataset_info",
    "check_available",
    "list_datasets",
    "data_root",
    "DATASETS",
    "DatasetSpec",
]
