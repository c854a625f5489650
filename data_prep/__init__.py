"""The data-prep stage: fMRI -> parcels -> QC -> robust scaling -> crops -> WebDataset shards + manifest."""
