"""volfm.metrics: numbers from arrays (never from checkpoints or tasks).

- ``classification``: AUROC (Mann-Whitney), AUPRC (average precision), multi-label macro/micro
  with an explicit scored-class rule, F1 and the F1-optimal threshold.
- ``probe``: linear probe (one-vs-rest L2 logistic regression, L-BFGS in float64) on frozen features.
- ``subgroups``: metrics per value or band of a cohort column, so bias is visible.
"""
