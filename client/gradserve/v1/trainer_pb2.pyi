from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LayerSpec(_message.Message):
    __slots__ = ("units", "activation", "negative_slope", "alpha", "dropout", "noise_std")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_SLOPE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    units: int
    activation: str
    negative_slope: float
    alpha: float
    dropout: float
    noise_std: float
    def __init__(self, units: _Optional[int] = ..., activation: _Optional[str] = ..., negative_slope: _Optional[float] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., noise_std: _Optional[float] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("units", "kind")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    units: int
    kind: str
    def __init__(self, units: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class LossSpec(_message.Message):
    __slots__ = ("name", "label_smoothing")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    name: str
    label_smoothing: float
    def __init__(self, name: _Optional[str] = ..., label_smoothing: _Optional[float] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "lr", "weight_decay", "eps", "momentum", "dampening", "nesterov", "beta1", "beta2", "amsgrad", "alpha", "centered", "lr_decay", "initial_accumulator_value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    AMSGRAD_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    CENTERED_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    weight_decay: float
    eps: float
    momentum: float
    dampening: float
    nesterov: bool
    beta1: float
    beta2: float
    amsgrad: bool
    alpha: float
    centered: bool
    lr_decay: float
    initial_accumulator_value: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: bool = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., amsgrad: bool = ..., alpha: _Optional[float] = ..., centered: bool = ..., lr_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ...) -> None: ...

class ScheduleSpec(_message.Message):
    __slots__ = ("name", "step_size", "gamma", "t_max", "eta_min")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    ETA_MIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    step_size: int
    gamma: float
    t_max: int
    eta_min: float
    def __init__(self, name: _Optional[str] = ..., step_size: _Optional[int] = ..., gamma: _Optional[float] = ..., t_max: _Optional[int] = ..., eta_min: _Optional[float] = ...) -> None: ...

class InitSpec(_message.Message):
    __slots__ = ("name", "value", "a", "b", "mean", "std", "gain")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    a: float
    b: float
    mean: float
    std: float
    gain: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., a: _Optional[float] = ..., b: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., gain: _Optional[float] = ...) -> None: ...

class RegularizationSpec(_message.Message):
    __slots__ = ("input_noise_std", "clip_grad_norm", "weight_noise_std", "target_noise_std")
    INPUT_NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    TARGET_NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    input_noise_std: float
    clip_grad_norm: float
    weight_noise_std: float
    target_noise_std: float
    def __init__(self, input_noise_std: _Optional[float] = ..., clip_grad_norm: _Optional[float] = ..., weight_noise_std: _Optional[float] = ..., target_noise_std: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("input_size", "hidden", "output", "loss", "optimizer", "schedule", "weight_init", "bias_init", "regularization", "dtype", "device", "seed", "replicas")
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_INIT_FIELD_NUMBER: _ClassVar[int]
    BIAS_INIT_FIELD_NUMBER: _ClassVar[int]
    REGULARIZATION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    input_size: int
    hidden: _containers.RepeatedCompositeFieldContainer[LayerSpec]
    output: OutputSpec
    loss: LossSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    weight_init: InitSpec
    bias_init: InitSpec
    regularization: RegularizationSpec
    dtype: str
    device: str
    seed: int
    replicas: int
    def __init__(self, input_size: _Optional[int] = ..., hidden: _Optional[_Iterable[_Union[LayerSpec, _Mapping]]] = ..., output: _Optional[_Union[OutputSpec, _Mapping]] = ..., loss: _Optional[_Union[LossSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., schedule: _Optional[_Union[ScheduleSpec, _Mapping]] = ..., weight_init: _Optional[_Union[InitSpec, _Mapping]] = ..., bias_init: _Optional[_Union[InitSpec, _Mapping]] = ..., regularization: _Optional[_Union[RegularizationSpec, _Mapping]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., seed: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("spec", "model_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    model_id: str
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., model_id: _Optional[str] = ...) -> None: ...

class ParamShape(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "num_params", "spec", "step", "created_unix", "params", "load_error")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_params: int
    spec: ModelSpec
    step: int
    created_unix: float
    params: _containers.RepeatedCompositeFieldContainer[ParamShape]
    load_error: str
    def __init__(self, model_id: _Optional[str] = ..., num_params: _Optional[int] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., step: _Optional[int] = ..., created_unix: _Optional[float] = ..., params: _Optional[_Iterable[_Union[ParamShape, _Mapping]]] = ..., load_error: _Optional[str] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("model_id", "inputs", "targets", "expected_step")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    inputs: Tensor
    targets: Tensor
    expected_step: int
    def __init__(self, model_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., expected_step: _Optional[int] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("step", "loss", "accuracy", "grad_norm", "lr")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    accuracy: float
    grad_norm: float
    lr: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., grad_norm: _Optional[float] = ..., lr: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model_id", "inputs", "logits")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    inputs: Tensor
    logits: bool
    def __init__(self, model_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., logits: bool = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: Tensor
    def __init__(self, outputs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetGradientsRequest(_message.Message):
    __slots__ = ("model_id", "inputs", "targets")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    inputs: Tensor
    targets: Tensor
    def __init__(self, model_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetGradientsResponse(_message.Message):
    __slots__ = ("loss", "gradients", "step")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    loss: float
    gradients: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    step: int
    def __init__(self, loss: _Optional[float] = ..., gradients: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., step: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWeightsRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetWeightsResponse(_message.Message):
    __slots__ = ("step", "weights")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    weights: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, step: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class SetWeightsRequest(_message.Message):
    __slots__ = ("model_id", "weights")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    weights: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, model_id: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class SaveModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class SaveModelResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("model_id", "name", "dtype", "shape", "offset", "data", "step", "loss")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    step: int
    loss: float
    def __init__(self, model_id: _Optional[str] = ..., name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class SetOptimizerRequest(_message.Message):
    __slots__ = ("model_id", "optimizer")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    optimizer: OptimizerSpec
    def __init__(self, model_id: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("tag", "step", "saved_unix")
    TAG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAVED_UNIX_FIELD_NUMBER: _ClassVar[int]
    tag: str
    step: int
    saved_unix: float
    def __init__(self, tag: _Optional[str] = ..., step: _Optional[int] = ..., saved_unix: _Optional[float] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("model_id", "tag")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tag: str
    def __init__(self, model_id: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ...) -> None: ...

class RestoreCheckpointRequest(_message.Message):
    __slots__ = ("model_id", "tag")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tag: str
    def __init__(self, model_id: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class RestoreCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint_step", "step")
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    checkpoint_step: int
    step: int
    def __init__(self, checkpoint_step: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("model_id", "gradients")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    gradients: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, model_id: _Optional[str] = ..., gradients: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class AccumulateGradientsRequest(_message.Message):
    __slots__ = ("model_id", "inputs", "targets")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    inputs: Tensor
    targets: Tensor
    def __init__(self, model_id: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AccumulateGradientsResponse(_message.Message):
    __slots__ = ("rows", "loss", "step")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    rows: int
    loss: float
    step: int
    def __init__(self, rows: _Optional[int] = ..., loss: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class OptimizerStepRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class DatasetChunk(_message.Message):
    __slots__ = ("inputs", "targets", "name")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    inputs: Tensor
    targets: Tensor
    name: str
    def __init__(self, inputs: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("dataset_id", "content_hash", "rows", "inputs_shape", "inputs_dtype", "targets_shape", "targets_dtype", "nbytes", "created_unix", "name")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    content_hash: str
    rows: int
    inputs_shape: _containers.RepeatedScalarFieldContainer[int]
    inputs_dtype: DataType
    targets_shape: _containers.RepeatedScalarFieldContainer[int]
    targets_dtype: DataType
    nbytes: int
    created_unix: float
    name: str
    def __init__(self, dataset_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., rows: _Optional[int] = ..., inputs_shape: _Optional[_Iterable[int]] = ..., inputs_dtype: _Optional[_Union[DataType, str]] = ..., targets_shape: _Optional[_Iterable[int]] = ..., targets_dtype: _Optional[_Union[DataType, str]] = ..., nbytes: _Optional[int] = ..., created_unix: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DeleteDatasetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FitRequest(_message.Message):
    __slots__ = ("model_id", "dataset_id", "epochs", "batch_size", "shuffle", "seed", "validation_dataset_id", "patience", "min_delta", "restore_best_weights", "progress_every_steps", "start_step")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    MIN_DELTA_FIELD_NUMBER: _ClassVar[int]
    RESTORE_BEST_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dataset_id: str
    epochs: int
    batch_size: int
    shuffle: bool
    seed: int
    validation_dataset_id: str
    patience: int
    min_delta: float
    restore_best_weights: bool
    progress_every_steps: int
    start_step: int
    def __init__(self, model_id: _Optional[str] = ..., dataset_id: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., shuffle: bool = ..., seed: _Optional[int] = ..., validation_dataset_id: _Optional[str] = ..., patience: _Optional[int] = ..., min_delta: _Optional[float] = ..., restore_best_weights: bool = ..., progress_every_steps: _Optional[int] = ..., start_step: _Optional[int] = ...) -> None: ...

class FitProgress(_message.Message):
    __slots__ = ("epoch", "epoch_step", "steps_per_epoch", "step", "loss", "accuracy", "lr", "epoch_end", "val_loss", "val_accuracy", "stopped_early", "best_epoch", "restored_best")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPOCH_END_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    STOPPED_EARLY_FIELD_NUMBER: _ClassVar[int]
    BEST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESTORED_BEST_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    epoch_step: int
    steps_per_epoch: int
    step: int
    loss: float
    accuracy: float
    lr: float
    epoch_end: bool
    val_loss: float
    val_accuracy: float
    stopped_early: bool
    best_epoch: int
    restored_best: bool
    def __init__(self, epoch: _Optional[int] = ..., epoch_step: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., lr: _Optional[float] = ..., epoch_end: bool = ..., val_loss: _Optional[float] = ..., val_accuracy: _Optional[float] = ..., stopped_early: bool = ..., best_epoch: _Optional[int] = ..., restored_best: bool = ...) -> None: ...
