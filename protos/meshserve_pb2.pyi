from protos import grpc_service_pb2 as _grpc_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplyLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLY_FRAMED: _ClassVar[ReplyLayout]
    REPLY_INFER_RESPONSE: _ClassVar[ReplyLayout]
    REPLY_STREAM_RESPONSE: _ClassVar[ReplyLayout]

class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[Code]
    CANCELLED: _ClassVar[Code]
    UNKNOWN: _ClassVar[Code]
    INVALID_ARGUMENT: _ClassVar[Code]
    DEADLINE_EXCEEDED: _ClassVar[Code]
    NOT_FOUND: _ClassVar[Code]
    ALREADY_EXISTS: _ClassVar[Code]
    PERMISSION_DENIED: _ClassVar[Code]
    RESOURCE_EXHAUSTED: _ClassVar[Code]
    FAILED_PRECONDITION: _ClassVar[Code]
    ABORTED: _ClassVar[Code]
    OUT_OF_RANGE: _ClassVar[Code]
    UNIMPLEMENTED: _ClassVar[Code]
    INTERNAL: _ClassVar[Code]
    UNAVAILABLE: _ClassVar[Code]
    DATA_LOSS: _ClassVar[Code]
    UNAUTHENTICATED: _ClassVar[Code]
REPLY_FRAMED: ReplyLayout
REPLY_INFER_RESPONSE: ReplyLayout
REPLY_STREAM_RESPONSE: ReplyLayout
OK: Code
CANCELLED: Code
UNKNOWN: Code
INVALID_ARGUMENT: Code
DEADLINE_EXCEEDED: Code
NOT_FOUND: Code
ALREADY_EXISTS: Code
PERMISSION_DENIED: Code
RESOURCE_EXHAUSTED: Code
FAILED_PRECONDITION: Code
ABORTED: Code
OUT_OF_RANGE: Code
UNIMPLEMENTED: Code
INTERNAL: Code
UNAVAILABLE: Code
DATA_LOSS: Code
UNAUTHENTICATED: Code

class Tensor(_message.Message):
    __slots__ = ("name", "datatype", "shape", "data", "data_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    data_bytes: int
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., data_bytes: _Optional[int] = ...) -> None: ...

class QueuedRequest(_message.Message):
    __slots__ = ("id", "model", "version", "tenant", "deadline_ms", "reply_to", "client_request_id", "inputs", "outputs", "trace_context", "enqueued_ms", "priority", "items", "shape_signature", "reply_layout", "response_head", "parameters", "class_counts")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ClassCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ENQUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    REPLY_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_HEAD_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    version: int
    tenant: str
    deadline_ms: int
    reply_to: str
    client_request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    trace_context: _containers.ScalarMap[str, str]
    enqueued_ms: int
    priority: int
    items: int
    shape_signature: str
    reply_layout: ReplyLayout
    response_head: bytes
    parameters: _containers.ScalarMap[str, str]
    class_counts: _containers.ScalarMap[str, int]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., tenant: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., reply_to: _Optional[str] = ..., client_request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., enqueued_ms: _Optional[int] = ..., priority: _Optional[int] = ..., items: _Optional[int] = ..., shape_signature: _Optional[str] = ..., reply_layout: _Optional[_Union[ReplyLayout, str]] = ..., response_head: _Optional[bytes] = ..., parameters: _Optional[_Mapping[str, str]] = ..., class_counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("id", "code", "message", "outputs", "model", "version", "queue_wait_us", "compute_us", "worker_id", "replied_unix_ns", "layout", "more", "index")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLIED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: Code
    message: str
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    model: str
    version: int
    queue_wait_us: int
    compute_us: int
    worker_id: str
    replied_unix_ns: int
    layout: ReplyLayout
    more: bool
    index: int
    def __init__(self, id: _Optional[str] = ..., code: _Optional[_Union[Code, str]] = ..., message: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., queue_wait_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., worker_id: _Optional[str] = ..., replied_unix_ns: _Optional[int] = ..., layout: _Optional[_Union[ReplyLayout, str]] = ..., more: _Optional[bool] = ..., index: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "version", "platform", "inputs", "outputs", "max_batch_size", "max_queue_delay_us", "preferred_batch_sizes", "ready", "path", "max_queue_size", "load_error", "state", "pinned", "evicted", "load_ms", "response_cache", "cache_shared", "client_config", "ensemble_steps", "decoupled", "queue_partitions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CACHE_FIELD_NUMBER: _ClassVar[int]
    CACHE_SHARED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECOUPLED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    platform: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    ready: bool
    path: str
    max_queue_size: int
    load_error: str
    state: str
    pinned: bool
    evicted: bool
    load_ms: int
    response_cache: bool
    cache_shared: bool
    client_config: ClientConfig
    ensemble_steps: _containers.RepeatedCompositeFieldContainer[EnsembleStep]
    decoupled: bool
    queue_partitions: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., platform: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., ready: _Optional[bool] = ..., path: _Optional[str] = ..., max_queue_size: _Optional[int] = ..., load_error: _Optional[str] = ..., state: _Optional[str] = ..., pinned: _Optional[bool] = ..., evicted: _Optional[bool] = ..., load_ms: _Optional[int] = ..., response_cache: _Optional[bool] = ..., cache_shared: _Optional[bool] = ..., client_config: _Optional[_Union[ClientConfig, _Mapping]] = ..., ensemble_steps: _Optional[_Iterable[_Union[EnsembleStep, _Mapping]]] = ..., decoupled: _Optional[bool] = ..., queue_partitions: _Optional[int] = ...) -> None: ...

class ClientConfig(_message.Message):
    __slots__ = ("input_formats", "label_filenames", "instances", "device", "version_policy", "latest_versions", "specific_versions", "sequence")
    class InputFormatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelFilenamesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FILENAMES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SPECIFIC_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    input_formats: _containers.ScalarMap[str, str]
    label_filenames: _containers.ScalarMap[str, str]
    instances: int
    device: str
    version_policy: str
    latest_versions: int
    specific_versions: _containers.RepeatedScalarFieldContainer[int]
    sequence: SequenceSpec
    def __init__(self, input_formats: _Optional[_Mapping[str, str]] = ..., label_filenames: _Optional[_Mapping[str, str]] = ..., instances: _Optional[int] = ..., device: _Optional[str] = ..., version_policy: _Optional[str] = ..., latest_versions: _Optional[int] = ..., specific_versions: _Optional[_Iterable[int]] = ..., sequence: _Optional[_Union[SequenceSpec, _Mapping]] = ...) -> None: ...

class SequenceSpec(_message.Message):
    __slots__ = ("idle_timeout_ms", "max_sequences", "max_sequences_per_tenant", "controls", "states")
    class Control(_message.Message):
        __slots__ = ("kind", "input", "datatype", "false_value", "true_value")
        KIND_FIELD_NUMBER: _ClassVar[int]
        INPUT_FIELD_NUMBER: _ClassVar[int]
        DATATYPE_FIELD_NUMBER: _ClassVar[int]
        FALSE_VALUE_FIELD_NUMBER: _ClassVar[int]
        TRUE_VALUE_FIELD_NUMBER: _ClassVar[int]
        kind: str
        input: str
        datatype: str
        false_value: float
        true_value: float
        def __init__(self, kind: _Optional[str] = ..., input: _Optional[str] = ..., datatype: _Optional[str] = ..., false_value: _Optional[float] = ..., true_value: _Optional[float] = ...) -> None: ...
    class State(_message.Message):
        __slots__ = ("input", "output", "datatype", "dims", "initial")
        INPUT_FIELD_NUMBER: _ClassVar[int]
        OUTPUT_FIELD_NUMBER: _ClassVar[int]
        DATATYPE_FIELD_NUMBER: _ClassVar[int]
        DIMS_FIELD_NUMBER: _ClassVar[int]
        INITIAL_FIELD_NUMBER: _ClassVar[int]
        input: str
        output: str
        datatype: str
        dims: _containers.RepeatedScalarFieldContainer[int]
        initial: float
        def __init__(self, input: _Optional[str] = ..., output: _Optional[str] = ..., datatype: _Optional[str] = ..., dims: _Optional[_Iterable[int]] = ..., initial: _Optional[float] = ...) -> None: ...
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    idle_timeout_ms: int
    max_sequences: int
    max_sequences_per_tenant: int
    controls: _containers.RepeatedCompositeFieldContainer[SequenceSpec.Control]
    states: _containers.RepeatedCompositeFieldContainer[SequenceSpec.State]
    def __init__(self, idle_timeout_ms: _Optional[int] = ..., max_sequences: _Optional[int] = ..., max_sequences_per_tenant: _Optional[int] = ..., controls: _Optional[_Iterable[_Union[SequenceSpec.Control, _Mapping]]] = ..., states: _Optional[_Iterable[_Union[SequenceSpec.State, _Mapping]]] = ...) -> None: ...

class EnsembleStep(_message.Message):
    __slots__ = ("model", "version", "input_map", "output_map")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_MAP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MAP_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    input_map: _containers.RepeatedCompositeFieldContainer[TensorMapping]
    output_map: _containers.RepeatedCompositeFieldContainer[TensorMapping]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., input_map: _Optional[_Iterable[_Union[TensorMapping, _Mapping]]] = ..., output_map: _Optional[_Iterable[_Union[TensorMapping, _Mapping]]] = ...) -> None: ...

class TensorMapping(_message.Message):
    __slots__ = ("step_tensor", "ensemble_tensor")
    STEP_TENSOR_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_TENSOR_FIELD_NUMBER: _ClassVar[int]
    step_tensor: str
    ensemble_tensor: str
    def __init__(self, step_tensor: _Optional[str] = ..., ensemble_tensor: _Optional[str] = ...) -> None: ...

class TrafficSplit(_message.Message):
    __slots__ = ("model", "weights", "sticky_by", "shadow_version", "shadow_share")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STICKY_BY_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SHARE_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.ScalarMap[int, int]
    sticky_by: str
    shadow_version: int
    shadow_share: float
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Mapping[int, int]] = ..., sticky_by: _Optional[str] = ..., shadow_version: _Optional[int] = ..., shadow_share: _Optional[float] = ...) -> None: ...

class RoutingTable(_message.Message):
    __slots__ = ("generation", "models", "splits", "payload_keys")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KEYS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    splits: _containers.RepeatedCompositeFieldContainer[TrafficSplit]
    payload_keys: bool
    def __init__(self, generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ..., splits: _Optional[_Iterable[_Union[TrafficSplit, _Mapping]]] = ..., payload_keys: _Optional[bool] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("gateway_id",)
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    def __init__(self, gateway_id: _Optional[str] = ...) -> None: ...

class ModelState(_message.Message):
    __slots__ = ("name", "version", "ready", "items_total", "requests_total", "device_seconds_total", "queue_wait_seconds_total", "weights_bytes", "activation_bytes", "load_error", "statistics", "load_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    ready: bool
    items_total: int
    requests_total: int
    device_seconds_total: float
    queue_wait_seconds_total: float
    weights_bytes: int
    activation_bytes: int
    load_error: str
    statistics: _grpc_service_pb2.ModelStatistics
    load_ms: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., ready: _Optional[bool] = ..., items_total: _Optional[int] = ..., requests_total: _Optional[int] = ..., device_seconds_total: _Optional[float] = ..., queue_wait_seconds_total: _Optional[float] = ..., weights_bytes: _Optional[int] = ..., activation_bytes: _Optional[int] = ..., load_error: _Optional[str] = ..., statistics: _Optional[_Union[_grpc_service_pb2.ModelStatistics, _Mapping]] = ..., load_ms: _Optional[int] = ...) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("worker_id", "device", "models", "draining", "device_kind", "device_profile", "device_memory_bytes", "payload_keys")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_KEYS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device: str
    models: _containers.RepeatedCompositeFieldContainer[ModelState]
    draining: bool
    device_kind: str
    device_profile: str
    device_memory_bytes: int
    payload_keys: bool
    def __init__(self, worker_id: _Optional[str] = ..., device: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelState, _Mapping]]] = ..., draining: _Optional[bool] = ..., device_kind: _Optional[str] = ..., device_profile: _Optional[str] = ..., device_memory_bytes: _Optional[int] = ..., payload_keys: _Optional[bool] = ...) -> None: ...

class WorkerAssignment(_message.Message):
    __slots__ = ("models", "report_interval_ms")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSpec]
    report_interval_ms: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSpec, _Mapping]]] = ..., report_interval_ms: _Optional[int] = ...) -> None: ...

class ModelDemand(_message.Message):
    __slots__ = ("model", "version", "gateway_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    gateway_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., gateway_id: _Optional[str] = ...) -> None: ...

class ModelDemandReply(_message.Message):
    __slots__ = ("placed", "expected_ms", "reason")
    PLACED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    placed: bool
    expected_ms: int
    reason: str
    def __init__(self, placed: _Optional[bool] = ..., expected_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
