"""Errors a user can act on: the CLI prints their message alone, without a traceback."""

from bi150_ray.checkpoint.gather import GatherError
from bi150_ray.checkpoint.merge import MergeError
from bi150_ray.config import ConfigError
from bi150_ray.data.mmap_format import CorpusFormatError
from bi150_ray.data.prepare import PrepareError
from bi150_ray.devices import DeviceDetectionError, IxsmiParseError
from bi150_ray.envcontract import EnvContractError
from bi150_ray.estimate import EstimateError
from bi150_ray.runrecord import RecordPathError


class GangError(RuntimeError):
    """The cluster cannot host the job; the message says what is missing."""


class DataPlanError(ValueError):
    """The job's data cannot be planned (no corpus, bad format, empty split); names the file."""


class RunFailed(RuntimeError):
    """The run stopped without finishing; the message has the cause and the last good checkpoint."""


USER_ERRORS = (
    ConfigError,
    CorpusFormatError,
    DeviceDetectionError,
    IxsmiParseError,
    EnvContractError,
    GangError,
    RunFailed,
    DataPlanError,
    GatherError,
    MergeError,
    EstimateError,
    RecordPathError,
    PrepareError,
)
