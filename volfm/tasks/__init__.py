"""volfm.tasks: one LightningModule per training objective (recipes name them by class_path), on a shared
base (:class:`~volfm.tasks.base.EncoderTask`) and small groups of settings that recipes fill."""
from volfm.tasks.base import DecoderConfig, EncoderConfig, EncoderTask, InferenceConfig, OptimConfig
from volfm.tasks.checkpoint import load_task
from volfm.tasks.pretrain import ContrastiveConfig, IcdHeadConfig, PretrainEvalConfig, PretrainTask
from volfm.tasks.segmentation import FinetuneConfig, SegmentationTask
from volfm.tasks.synthesis import DiscriminatorConfig, SynthesisLossConfig, SynthesisTask

__all__ = ["ContrastiveConfig", "DecoderConfig", "DiscriminatorConfig", "EncoderConfig", "EncoderTask", "FinetuneConfig",
           "IcdHeadConfig", "InferenceConfig", "OptimConfig", "PretrainEvalConfig", "PretrainTask", "SegmentationTask",
           "SynthesisLossConfig", "SynthesisTask", "load_task"]
