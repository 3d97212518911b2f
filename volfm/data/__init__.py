"""volfm.data: what training reads from a store: the dataset over a store's cases, patch samplers, TorchIO
augmentation, seeded input degradations, and the Lightning DataModules that recipes name."""
from volfm.data.datamodules import (
    PairedModalityDataModule,
    PretrainDataModule,
    SegmentationDataModule,
    StoreDataModule,
)

__all__ = ["PairedModalityDataModule", "PretrainDataModule", "SegmentationDataModule", "StoreDataModule"]
