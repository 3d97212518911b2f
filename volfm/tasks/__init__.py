"""volfm.tasks: one LightningModule per training objective (recipes name them by class_path), on a shared
base (:class:`~volfm.tasks.base.EncoderTask`) and small groups of settings that recipes fill."""
from volfm.tasks.base import DecoderConfig, EncoderConfig, EncoderTask, InferenceConfig, OptimConfig
from volfm.tasks.checkpoint import load_task
from volfm.tasks.pretrain import (
    ContrastiveConfig,
    IcdHeadConfig,
    MAETask,
    MaskedVolumeTask,
    PretrainEvalConfig,
    PretrainOptimConfig,
    PretrainTask,
)
from volfm.tasks.segmentation import FinetuneConfig, SegmentationLossConfig, SegmentationOptimConfig, SegmentationTask
from volfm.tasks.ssl import MAEConfig, MaskedVolumeConfig
from volfm.tasks.synthesis import DiscriminatorConfig, SynthesisLossConfig, SynthesisOptimConfig, SynthesisTask

__all__ = ["ContrastiveConfig", "DecoderConfig", "DiscriminatorConfig", "EncoderConfig", "EncoderTask",
           "FinetuneConfig", "IcdHeadConfig", "InferenceConfig", "MAEConfig", "MAETask", "MaskedVolumeConfig",
           "MaskedVolumeTask", "OptimConfig", "PretrainEvalConfig", "PretrainOptimConfig", "PretrainTask",
           "SegmentationLossConfig", "SegmentationOptimConfig", "SegmentationTask", "SynthesisLossConfig", "SynthesisOptimConfig",
           "SynthesisTask", "load_task"]

_REPLACED = {
    "IcdPretrainTask": "volfm.tasks.PretrainTask with icd: {level: ..., min_count: ...} and contrastive: null "
                       "(recipes/icd_pretrain.yaml)",
    "ReportContrastiveTask": "volfm.tasks.PretrainTask with contrastive: {...} and icd: null, or both for multi-task "
                             "(recipes/report_contrastive.yaml, recipes/multitask_pretrain.yaml)",
}


def __getattr__(name: str):
    if name in _REPLACED:  # a recipe written for volfm 0.1 names a class that the settings groups replaced
        raise AttributeError(f"volfm.tasks.{name} was replaced by {_REPLACED[name]}; task settings now come in groups "
                             "(encoder, optim, ...): see recipes/README.md")
    raise AttributeError(f"module 'volfm.tasks' has no attribute {name!r}")
