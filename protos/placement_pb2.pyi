from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_ATTENTION: _ClassVar[WorkerRole]
    WORKER_ROLE_EXPERT: _ClassVar[WorkerRole]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_ALIVE: _ClassVar[WorkerState]
    WORKER_STATE_SUSPECT: _ClassVar[WorkerState]
    WORKER_STATE_DEAD: _ClassVar[WorkerState]
    WORKER_STATE_DRAINING: _ClassVar[WorkerState]

class UpdatePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_PHASE_UNSPECIFIED: _ClassVar[UpdatePhase]
    UPDATE_PHASE_COMMIT: _ClassVar[UpdatePhase]
    UPDATE_PHASE_PREPARE: _ClassVar[UpdatePhase]
    UPDATE_PHASE_RETIRE: _ClassVar[UpdatePhase]
    UPDATE_PHASE_ROLLBACK: _ClassVar[UpdatePhase]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_ATTENTION: WorkerRole
WORKER_ROLE_EXPERT: WorkerRole
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_ALIVE: WorkerState
WORKER_STATE_SUSPECT: WorkerState
WORKER_STATE_DEAD: WorkerState
WORKER_STATE_DRAINING: WorkerState
UPDATE_PHASE_UNSPECIFIED: UpdatePhase
UPDATE_PHASE_COMMIT: UpdatePhase
UPDATE_PHASE_PREPARE: UpdatePhase
UPDATE_PHASE_RETIRE: UpdatePhase
UPDATE_PHASE_ROLLBACK: UpdatePhase

class ExpertMap(_message.Message):
    __slots__ = ("version", "num_layers", "num_logical_experts", "num_physical_slots", "phy2log", "max_replicas", "log2phy", "logcnt", "slot_owners", "checksum")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PHYSICAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LOG2PHY_FIELD_NUMBER: _ClassVar[int]
    LOGCNT_FIELD_NUMBER: _ClassVar[int]
    SLOT_OWNERS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_layers: int
    num_logical_experts: int
    num_physical_slots: int
    phy2log: _containers.RepeatedScalarFieldContainer[int]
    max_replicas: int
    log2phy: _containers.RepeatedScalarFieldContainer[int]
    logcnt: _containers.RepeatedScalarFieldContainer[int]
    slot_owners: _containers.RepeatedScalarFieldContainer[str]
    checksum: str
    def __init__(self, version: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_logical_experts: _Optional[int] = ..., num_physical_slots: _Optional[int] = ..., phy2log: _Optional[_Iterable[int]] = ..., max_replicas: _Optional[int] = ..., log2phy: _Optional[_Iterable[int]] = ..., logcnt: _Optional[_Iterable[int]] = ..., slot_owners: _Optional[_Iterable[str]] = ..., checksum: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "rank", "state", "capacity", "device", "last_heartbeat_unix_ms", "map_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    rank: int
    state: WorkerState
    capacity: float
    device: str
    last_heartbeat_unix_ms: int
    map_version: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., rank: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., capacity: _Optional[float] = ..., device: _Optional[str] = ..., last_heartbeat_unix_ms: _Optional[int] = ..., map_version: _Optional[int] = ...) -> None: ...

class DataPlaneInfo(_message.Message):
    __slots__ = ("backend", "dist_init_addr", "world_size", "workers")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DIST_INIT_ADDR_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    dist_init_addr: str
    world_size: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, backend: _Optional[str] = ..., dist_init_addr: _Optional[str] = ..., world_size: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "role", "address", "capacity", "device", "model_fingerprint", "previous_rank")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_RANK_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    capacity: float
    device: str
    model_fingerprint: str
    previous_rank: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., capacity: _Optional[float] = ..., device: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., previous_rank: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("rank", "world_size", "dist_init_addr", "heartbeat_interval_ms", "backend", "elastic_ep_backend")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIST_INIT_ADDR_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ELASTIC_EP_BACKEND_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    dist_init_addr: str
    heartbeat_interval_ms: int
    backend: str
    elastic_ep_backend: str
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., dist_init_addr: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., backend: _Optional[str] = ..., elastic_ep_backend: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchPlacementRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class PlacementUpdate(_message.Message):
    __slots__ = ("phase", "map", "data_plane")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    phase: UpdatePhase
    map: ExpertMap
    data_plane: DataPlaneInfo
    def __init__(self, phase: _Optional[_Union[UpdatePhase, str]] = ..., map: _Optional[_Union[ExpertMap, _Mapping]] = ..., data_plane: _Optional[_Union[DataPlaneInfo, _Mapping]] = ...) -> None: ...

class AckPlacementRequest(_message.Message):
    __slots__ = ("worker_id", "version", "phase", "ok", "error")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    version: int
    phase: UpdatePhase
    ok: bool
    error: str
    def __init__(self, worker_id: _Optional[str] = ..., version: _Optional[int] = ..., phase: _Optional[_Union[UpdatePhase, str]] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class AckPlacementResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportLoadRequest(_message.Message):
    __slots__ = ("worker_id", "map_version", "num_layers", "num_physical_slots", "slot_token_counts", "num_passes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PHYSICAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PASSES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    map_version: int
    num_layers: int
    num_physical_slots: int
    slot_token_counts: _containers.RepeatedScalarFieldContainer[int]
    num_passes: int
    def __init__(self, worker_id: _Optional[str] = ..., map_version: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_physical_slots: _Optional[int] = ..., slot_token_counts: _Optional[_Iterable[int]] = ..., num_passes: _Optional[int] = ...) -> None: ...

class ReportLoadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReportSuspicionRequest(_message.Message):
    __slots__ = ("worker_id", "suspect_rank", "reason", "map_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    suspect_rank: int
    reason: str
    map_version: int
    def __init__(self, worker_id: _Optional[str] = ..., suspect_rank: _Optional[int] = ..., reason: _Optional[str] = ..., map_version: _Optional[int] = ...) -> None: ...

class ReportSuspicionResponse(_message.Message):
    __slots__ = ("state", "current_version")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    state: WorkerState
    current_version: int
    def __init__(self, state: _Optional[_Union[WorkerState, str]] = ..., current_version: _Optional[int] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class GetPlacementResponse(_message.Message):
    __slots__ = ("map", "balancedness", "eplb_enabled", "eplb_paused", "versions", "window_balancedness", "window_num_passes", "eplb_algorithm", "rebalance_in_progress", "num_rebalances", "num_rollbacks", "last_rebalance_ms", "last_operation")
    MAP_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    EPLB_ENABLED_FIELD_NUMBER: _ClassVar[int]
    EPLB_PAUSED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_NUM_PASSES_FIELD_NUMBER: _ClassVar[int]
    EPLB_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    REBALANCE_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_REBALANCES_FIELD_NUMBER: _ClassVar[int]
    NUM_ROLLBACKS_FIELD_NUMBER: _ClassVar[int]
    LAST_REBALANCE_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_OPERATION_FIELD_NUMBER: _ClassVar[int]
    map: ExpertMap
    balancedness: float
    eplb_enabled: bool
    eplb_paused: bool
    versions: _containers.RepeatedScalarFieldContainer[int]
    window_balancedness: float
    window_num_passes: int
    eplb_algorithm: str
    rebalance_in_progress: bool
    num_rebalances: int
    num_rollbacks: int
    last_rebalance_ms: float
    last_operation: str
    def __init__(self, map: _Optional[_Union[ExpertMap, _Mapping]] = ..., balancedness: _Optional[float] = ..., eplb_enabled: _Optional[bool] = ..., eplb_paused: _Optional[bool] = ..., versions: _Optional[_Iterable[int]] = ..., window_balancedness: _Optional[float] = ..., window_num_passes: _Optional[int] = ..., eplb_algorithm: _Optional[str] = ..., rebalance_in_progress: _Optional[bool] = ..., num_rebalances: _Optional[int] = ..., num_rollbacks: _Optional[int] = ..., last_rebalance_ms: _Optional[float] = ..., last_operation: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("algorithm", "layers")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, algorithm: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class PlanRebalanceResponse(_message.Message):
    __slots__ = ("map", "balancedness_before", "balancedness_after", "experts_moved", "bytes_moved", "plan_ms", "algorithm", "changed_layers")
    MAP_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    PLAN_MS_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CHANGED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    map: ExpertMap
    balancedness_before: float
    balancedness_after: float
    experts_moved: int
    bytes_moved: int
    plan_ms: float
    algorithm: str
    changed_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, map: _Optional[_Union[ExpertMap, _Mapping]] = ..., balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ..., experts_moved: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., plan_ms: _Optional[float] = ..., algorithm: _Optional[str] = ..., changed_layers: _Optional[_Iterable[int]] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("version", "balancedness_before", "balancedness_after", "experts_moved", "duration_ms", "previous_version", "num_versions", "bytes_moved", "plan_ms", "message")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    PLAN_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    version: int
    balancedness_before: float
    balancedness_after: float
    experts_moved: int
    duration_ms: float
    previous_version: int
    num_versions: int
    bytes_moved: int
    plan_ms: float
    message: str
    def __init__(self, version: _Optional[int] = ..., balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ..., experts_moved: _Optional[int] = ..., duration_ms: _Optional[float] = ..., previous_version: _Optional[int] = ..., num_versions: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., plan_ms: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class SetRedundancyRequest(_message.Message):
    __slots__ = ("num_redundant_experts",)
    NUM_REDUNDANT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    num_redundant_experts: int
    def __init__(self, num_redundant_experts: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseEplbRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeEplbRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EplbStateResponse(_message.Message):
    __slots__ = ("enabled", "paused")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    paused: bool
    def __init__(self, enabled: _Optional[bool] = ..., paused: _Optional[bool] = ...) -> None: ...

class ExportSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class AdminDumpExpertDistributionRequest(_message.Message):
    __slots__ = ("directory", "worker_timeout_s")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    WORKER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    directory: str
    worker_timeout_s: float
    def __init__(self, directory: _Optional[str] = ..., worker_timeout_s: _Optional[float] = ...) -> None: ...

class AttentionWorkerDump(_message.Message):
    __slots__ = ("worker_id", "address", "status_code", "message", "path", "mode", "num_passes", "num_token_records")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_PASSES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKEN_RECORDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    status_code: str
    message: str
    path: str
    mode: str
    num_passes: int
    num_token_records: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., status_code: _Optional[str] = ..., message: _Optional[str] = ..., path: _Optional[str] = ..., mode: _Optional[str] = ..., num_passes: _Optional[int] = ..., num_token_records: _Optional[int] = ...) -> None: ...

class AdminDumpExpertDistributionResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[AttentionWorkerDump]
    def __init__(self, workers: _Optional[_Iterable[_Union[AttentionWorkerDump, _Mapping]]] = ...) -> None: ...
