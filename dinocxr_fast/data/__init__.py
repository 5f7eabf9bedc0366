"""Data: dataset sources, DALI pipelines (GPU or CPU-only), a torch fallback loader, phantoms.

Layout (one job per module):
  samples     Sample, Source (the common list of samples), DatasetError
  sources     ImageFolderSource, CsvSource (+ COVIDx), DicomSource, source_from_config
  synthetic   procedural chest phantoms, SyntheticSource (the default dataset)
  subsets     label-fraction subsets and patient-grouped splits
  imageio     reading, format probes and integrity checks, DICOM decoding
  views       ViewsConfig / ViewSpec (pretraining views), EvalConfig (the evaluation transform)
  planning    epoch order, sharding and every augmentation parameter, from (seed, epoch, index)
  assemble    batch preparation: reads, skips unreadable files, plans
  dali_graph  the DALI graphs; dali_runner runs them
  torch_ops   the same transforms with PIL + torch; torch_runner runs them in DataLoader workers
  loaders     build_pretrain_loader / build_labelled_loader: what the trainer uses
"""
from .views import EvalConfig, ViewsConfig, ViewSpec
from .imageio import CorruptImageError
from .loaders import (
    LabelledLoader,
    PretrainLoader,
    build_labelled_loader,
    build_pretrain_loader,
    dali_available,
)
from .samples import UNLABELLED, DatasetError, Sample, Source
from .sources import CsvSource, DicomSource, ImageFolderSource, kermany_patient_id, source_from_config
from .subsets import label_fraction, label_fraction_subset, split_by_patient
from .synthetic import SyntheticSource, render_phantom

__all__ = [
    "CorruptImageError",
    "CsvSource",
    "DatasetError",
    "DicomSource",
    "EvalConfig",
    "LabelledLoader",
    "ImageFolderSource",
    "PretrainLoader",
    "Sample",
    "Source",
    "SyntheticSource",
    "UNLABELLED",
    "ViewSpec",
    "ViewsConfig",
    "build_labelled_loader",
    "build_pretrain_loader",
    "dali_available",
    "kermany_patient_id",
    "label_fraction",
    "label_fraction_subset",
    "render_phantom",
    "source_from_config",
    "split_by_patient",
]
