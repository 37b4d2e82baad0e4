"""Activation shard store, schema version 3 (HDF5 shards + JSON manifest; see docs/shards.md).

The public names live here; the format helpers, the writer and the reader sit in
`format.py` (constants, RowMeta, codecs), `commit.py` (atomic shard commit), `write.py`
(ShardWriter) and `read.py` (ActivationStore).
"""
from activations.store.format import SCHEMA_VERSION, RowMeta
from activations.store.read import ActivationStore
from activations.store.write import ShardWriter

__all__ = ["SCHEMA_VERSION", "ActivationStore", "RowMeta", "ShardWriter"]
