"""Data contract: object store access, the shard/manifest format, robust scaling and the training loader."""
