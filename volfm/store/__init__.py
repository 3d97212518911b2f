"""volfm.store: the on-disk store of preprocessed cases, built from a cohort table.

- ``cohort``: reading and checking cohort tables (CSV/TSV), the manifest's columns.
- ``layout``: the store format (manifest.csv, spec.yaml, cases/<id>/<input>.npy|.b2nd + meta.json, qc/).
- ``arrays``: how each array is encoded (npy/blosc2, float32/compact), read back, verified and re-encoded.
- ``build``: ``volfm preprocess``: a cohort through a preprocessing spec into a store (workers, shards, resume).
- ``splits``: deterministic train/val/test assignment.
- ``foreground``: per-class foreground voxel locations stored beside each label.
"""
