"""What a recording is, below both the library and the shard build: where recordings are found (BIDS / fMRIPrep
trees, NIfTI, arrays; ``sources``), the atlas that parcellates them (``atlas``), parcellation, cleaning, orientation
and resampling in time (``parcellate``), the quality checks (``qc``) and the tables they are described by
(``tables``). ``brainlm.api`` prepares a user's recording for a model with these, and ``data_prep`` builds shard
sets with the same code; the scaling itself is the model's (``brainlm.model.scaling``)."""
