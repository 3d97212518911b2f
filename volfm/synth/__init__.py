"""volfm.synth: synthetic cohorts written as real files (NIfTI + a cohort table): CT with findings, ICD codes and
reports (``ct``), paired brain MRI/PET (``mripet``). Used by the demo, the benchmarks and the tests."""
