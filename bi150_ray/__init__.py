"""bi150-ray: run PaddleNLP LLaMA pretraining on BI150 clusters through Ray.

    from bi150_ray import PretrainJob
    result = PretrainJob("jobs/configs/my_job.json").run()   # connects to RAY_ADDRESS
"""

from bi150_ray.config import ConfigError, JobConfig, RuntimeConfig
from bi150_ray.config import load as load_config
from bi150_ray.driver import JobResult, PretrainJob
from bi150_ray.errors import GangError, RunFailed

__all__ = ["ConfigError", "GangError", "JobConfig", "JobResult", "PretrainJob", "RunFailed", "RuntimeConfig", "load_config"]
__version__ = "0.1.0"
