"""volfm.targets: what a case is labelled with, as plain data: ICD-10-CM code vocabularies (``icd``), report
sections and text views (``reports``), segmentation label maps (``labelmap``)."""
