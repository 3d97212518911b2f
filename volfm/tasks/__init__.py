"""volfm.tasks: one LightningModule per training objective (recipes name them by class_path)."""
from volfm.tasks.pretrain import IcdPretrainTask, PretrainTask, ReportContrastiveTask
from volfm.tasks.segmentation import SegmentationTask
from volfm.tasks.synthesis import SynthesisTask

__all__ = ["IcdPretrainTask", "PretrainTask", "ReportContrastiveTask", "SegmentationTask", "SynthesisTask"]
