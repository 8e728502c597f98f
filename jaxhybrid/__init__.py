"""jaxhybrid: inference memory for hybrid attention + recurrent models, as pure JAX pytrees."""

from jaxhybrid._batch import (
    Batch,
    BatchCheck,
    BatchError,
    BatchErrorCode,
    SplitKind,
    UBatch,
    UBatchPlan,
    get_ubatch,
    make_batch,
    raise_for_check,
    seq_membership,
    split,
    split_equal,
    split_seq,
    split_simple,
    validate,
)
from jaxhybrid._config import KVConfig, RecurrentConfig, SWAType
from jaxhybrid._status import JaxHybridError, MemoryStatus, combine_status, is_fail

__version__ = "0.1.0.dev0"

__all__ = [
    "Batch",
    "BatchCheck",
    "BatchError",
    "BatchErrorCode",
    "JaxHybridError",
    "KVConfig",
    "MemoryStatus",
    "RecurrentConfig",
    "SWAType",
    "SplitKind",
    "UBatch",
    "UBatchPlan",
    "combine_status",
    "get_ubatch",
    "is_fail",
    "make_batch",
    "raise_for_check",
    "seq_membership",
    "split",
    "split_equal",
    "split_seq",
    "split_simple",
    "validate",
]
