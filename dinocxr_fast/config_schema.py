"""The typed schema of every config key: its type, range and choices, for pretraining
(``configs/base.yaml``) and the supervised commands (``configs/supervised_base.yaml``).

``validate(cfg, base)`` checks the whole effective config at once and returns one line per
problem, so a user fixes them all in one go, before any model or data is built. pydantic does
the type checking (no silent coercion of text into numbers: ``optim.lr=abc`` is an error) and
the ranges ((low, high) pairs in order, at least two views).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# kept in step with dinocxr_fast.models.vitaev2.CONFIGS (a test compares them); importing the
# model module here would import torch and slow every command's start
ARCHS = ("vitaev2_tiny", "vitaev2_s", "vitaev2_48m", "vitaev2_b")

PosInt = Annotated[int, Field(strict=True, ge=1)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Prob = Annotated[float, Field(ge=0, le=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Momentum = Annotated[float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    # strict for numbers given as text: "abc" or "ten" must not slip through as a string
    model_config = ConfigDict(extra="forbid", strict=True)


def _ordered(lo: float = 0.0, hi: float = float("inf")):
    """A [low, high] pair with lo < low <= high <= hi."""
    def check(value: list[float]) -> list[float]:
        a, b = value
        if not lo < a <= b <= hi:
            raise ValueError(f"must be [low, high] with {lo:g} < low <= high <= {hi:g}, got {list(value)}")
        return value
    return AfterValidator(check)


_Pair = Annotated[list[Annotated[float, Field(strict=False)]], Field(min_length=2, max_length=2)]
Pair = Annotated[_Pair, _ordered()]
UnitPair = Annotated[_Pair, _ordered(hi=1.0)]  # crop scales: a fraction of the image


class ModelBase(_Section):
    arch: Literal[ARCHS]  # type: ignore[valid-type]
    in_chans: Literal[1, 3]
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)]


class PretrainModel(ModelBase):
    out_dim: PosInt
    head_hidden_dim: PosInt
    head_bottleneck_dim: PosInt
    head_layers: PosInt
    norm_last_layer: Bool
    use_bn_in_head: Bool


class SupervisedModel(ModelBase):
    pretrained: Optional[str] = None


class Augment(_Section):
    jitter_p: Optional[Prob] = None
    brightness: Optional[Annotated[float, Field(ge=0, lt=1)]] = None
    contrast: Optional[Annotated[float, Field(ge=0, lt=1)]] = None
    solarize_p: Optional[Prob] = None
    blur_sigma: Optional[Pair] = None


class DecodeGuards(_Section):
    max_image_pixels: PosInt
    dicom_any_modality: Bool


class PretrainData(DecodeGuards):
    source: Optional[dict] = None  # data/sources.source_from_config's mapping; checked when the source is built
    path: Optional[str] = None
    csv: Optional[str] = None
    split: Optional[str] = None
    synthetic_count: PosInt
    synthetic_size: Annotated[int, Field(strict=True, ge=8)]
    loader: Literal["auto", "dali", "torch"]
    num_workers: NonNegInt
    shard_by: Literal["rank", "node"]
    views: Literal["dino_cxr", "dino_multicrop"]
    view_size: Annotated[int, Field(strict=True, ge=8)]
    n_views: Annotated[int, Field(strict=True, ge=2)]  # DINO compares views: one is no task
    global_scale: UnitPair
    local_size: Annotated[int, Field(strict=True, ge=8)]
    n_local: NonNegInt
    local_scale: UnitPair
    augment: Augment


class SupervisedData(DecodeGuards):
    path: Optional[str] = None
    train_split: str
    val_split: str
    test_split: str
    label_fraction: Fraction
    label_seed: NonNegInt
    image_size: Annotated[int, Field(strict=True, ge=8)]
    train_scale: UnitPair
    loader: Literal["auto", "dali", "torch"]
    num_workers: NonNegInt


class OptimBase(_Section):
    name: Literal["adam", "adamw", "sgd"]
    lr: PosFloat
    lr_scaling: Literal["linear", "none"]
    min_lr: NonNegFloat
    warmup_epochs: NonNegFloat
    schedule: Literal["cosine", "constant"]
    weight_decay: NonNegFloat
    weight_decay_end: NonNegFloat
    clip_grad: NonNegFloat
    batch_size: PosInt
    momentum: Momentum
    betas: Annotated[list[Annotated[float, Field(strict=False, ge=0, lt=1)]], Field(min_length=2, max_length=2)]


class PretrainOptim(OptimBase):
    freeze_last_layer_epochs: NonNegFloat


class SupervisedOptim(OptimBase):
    layer_decay: Annotated[float, Field(gt=0, le=1)]
    class_weighting: Literal["balanced", "none"]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]


class Dino(_Section):
    momentum_teacher: Annotated[float, Field(ge=0, le=1)]
    warmup_teacher_temp: PosFloat
    teacher_temp: PosFloat
    warmup_teacher_temp_epochs: NonNegInt
    student_temp: PosFloat
    center_momentum: Annotated[float, Field(ge=0, le=1)]
    centering: Literal["ema", "sinkhorn"]
    sinkhorn_iterations: PosInt
    koleo_weight: NonNegFloat
    backend: Literal["auto", "cpp", "cuda", "triton", "torch"]


class TrainBase(_Section):
    epochs: PosInt
    max_steps: Optional[PosInt] = None
    max_minutes: Optional[PosFloat] = None
    seed: NonNegInt
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    log_every: PosInt
    ckpt_every: PosInt
    keep_last: PosInt


class PretrainTrain(TrainBase):
    fit_schedules: Bool
    compile: Bool
    loss_check_every: PosInt
    knn_data: Optional[str] = None
    knn_every: NonNegInt
    knn_k: PosInt
    knn_temperature: PosFloat
    knn_size: Annotated[int, Field(strict=True, ge=8)]


class Linear(_Section):
    lrs: Annotated[list[PosFloat], Field(min_length=1)]
    weight_decays: Annotated[list[NonNegFloat], Field(min_length=1)]
    epochs: PosInt
    batch_size: PosInt
    select_by: Literal["roc_auc", "accuracy", "balanced_accuracy", "f1"]
    cache_dir: Optional[str] = None


class Eval(_Section):
    bootstrap: NonNegInt
    select_by: Literal["roc_auc", "accuracy", "balanced_accuracy", "f1"]


class PretrainConfig(_Section):
    model: PretrainModel
    data: PretrainData
    optim: PretrainOptim
    dino: Dino
    train: PretrainTrain


class SupervisedConfig(_Section):
    model: SupervisedModel
    data: SupervisedData
    optim: SupervisedOptim
    linear: Linear
    eval: Eval
    train: TrainBase


SCHEMAS = {"base": PretrainConfig, "supervised_base": SupervisedConfig}


def _line(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"])
    value = err.get("input")
    if err["type"] == "value_error":  # our own validators: the message shows the value
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return f"{where}: {err['msg'].lower()}{shown}" if where else f"{err['msg']}{shown}"


def validate(cfg: dict, base: str = "base") -> list[str]:
    """Every problem of ``cfg`` against the ``base`` schema, one line each (empty: valid)."""
    try:
        SCHEMAS[base].model_validate(cfg)
    except ValidationError as exc:
        return [_line(e) for e in exc.errors(include_url=False)]
    return []
