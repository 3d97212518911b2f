"""volfm.tasks: one LightningModule per training objective (recipes name them by class_path)."""
from volfm.tasks.pretrain import IcdPretrainTask, PretrainTask, ReportContrastiveTask

__all__ = ["IcdPretrainTask", "PretrainTask", "ReportContrastiveTask"]
