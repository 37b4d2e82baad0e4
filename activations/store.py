"""Activation shard store, schema version 1 (HDF5 shards + JSON manifest; see docs/shards.md).

The public names live here; the format helpers, the writer and the reader sit in
`store_format.py` (constants, RowMeta, codecs), `store_commit.py` (atomic shard commit),
`store_write.py` (ShardWriter) and `store_read.py` (ActivationStore).
"""
from activations.store_format import SCHEMA_VERSION, RowMeta
from activations.store_read import ActivationStore
from activations.store_write import ShardWriter

__all__ = ["SCHEMA_VERSION", "ActivationStore", "RowMeta", "ShardWriter"]
