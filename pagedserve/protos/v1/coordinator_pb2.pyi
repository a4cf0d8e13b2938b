from pagedserve.protos.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CoreRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "beam_search", "priority", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    BEAM_SEARCH_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    beam_search: _generation_pb2.BeamSearchParams
    priority: int
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., beam_search: _Optional[_Union[_generation_pb2.BeamSearchParams, _Mapping]] = ..., priority: _Optional[int] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class AddRequestsRequest(_message.Message):
    __slots__ = ("subscriber", "requests")
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    subscriber: str
    requests: _containers.RepeatedCompositeFieldContainer[CoreRequest]
    def __init__(self, subscriber: _Optional[str] = ..., requests: _Optional[_Iterable[_Union[CoreRequest, _Mapping]]] = ...) -> None: ...

class AddRequestsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("subscriber",)
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    subscriber: str
    def __init__(self, subscriber: _Optional[str] = ...) -> None: ...

class PromptLogprobsChunk(_message.Message):
    __slots__ = ("start", "entries")
    START_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    start: int
    entries: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    def __init__(self, start: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class SequenceUpdate(_message.Message):
    __slots__ = ("request_id", "index", "new_token_ids", "logprobs", "prompt_logprobs", "finish_reason", "stop_token_id", "stop_string", "num_cached_tokens", "num_preemptions")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    prompt_logprobs: PromptLogprobsChunk
    finish_reason: _generation_pb2.FinishReason
    stop_token_id: int
    stop_string: str
    num_cached_tokens: int
    num_preemptions: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Union[PromptLogprobsChunk, _Mapping]] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., stop_token_id: _Optional[int] = ..., stop_string: _Optional[str] = ..., num_cached_tokens: _Optional[int] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class BeamSequence(_message.Message):
    __slots__ = ("token_ids", "cumulative_logprob", "score")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    cumulative_logprob: float
    score: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., cumulative_logprob: _Optional[float] = ..., score: _Optional[float] = ...) -> None: ...

class BeamResult(_message.Message):
    __slots__ = ("request_id", "sequences")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sequences: _containers.RepeatedCompositeFieldContainer[BeamSequence]
    def __init__(self, request_id: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[BeamSequence, _Mapping]]] = ...) -> None: ...

class RequestFailure(_message.Message):
    __slots__ = ("request_id", "status", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: str
    message: str
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RequestStart(_message.Message):
    __slots__ = ("request_id", "queue_seconds", "prefill_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queue_seconds: float
    prefill_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ...) -> None: ...

class EngineSnapshot(_message.Message):
    __slots__ = ("num_running", "num_waiting", "num_swapped", "num_requests", "kv_blocks_used", "kv_blocks_total", "num_preemptions", "prefix_cache_queries", "prefix_cache_hits", "iteration_tokens_counts", "iteration_tokens_sum")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_SWAPPED_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    ITERATION_TOKENS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ITERATION_TOKENS_SUM_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_waiting: int
    num_swapped: int
    num_requests: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    iteration_tokens_counts: _containers.RepeatedScalarFieldContainer[int]
    iteration_tokens_sum: int
    def __init__(self, num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_swapped: _Optional[int] = ..., num_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ..., iteration_tokens_counts: _Optional[_Iterable[int]] = ..., iteration_tokens_sum: _Optional[int] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("updates", "beam_results", "failures", "step_time", "starts", "stats")
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    BEAM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    updates: _containers.RepeatedCompositeFieldContainer[SequenceUpdate]
    beam_results: _containers.RepeatedCompositeFieldContainer[BeamResult]
    failures: _containers.RepeatedCompositeFieldContainer[RequestFailure]
    step_time: float
    starts: _containers.RepeatedCompositeFieldContainer[RequestStart]
    stats: EngineSnapshot
    def __init__(self, updates: _Optional[_Iterable[_Union[SequenceUpdate, _Mapping]]] = ..., beam_results: _Optional[_Iterable[_Union[BeamResult, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[RequestFailure, _Mapping]]] = ..., step_time: _Optional[float] = ..., starts: _Optional[_Iterable[_Union[RequestStart, _Mapping]]] = ..., stats: _Optional[_Union[EngineSnapshot, _Mapping]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetGpuTelemetryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GpuTelemetry(_message.Message):
    __slots__ = ("gpus",)
    GPUS_FIELD_NUMBER: _ClassVar[int]
    gpus: _containers.RepeatedCompositeFieldContainer[_generation_pb2.GpuStats]
    def __init__(self, gpus: _Optional[_Iterable[_Union[_generation_pb2.GpuStats, _Mapping]]] = ...) -> None: ...
