"""bi150-ray: run PaddleNLP LLaMA pretraining on BI150 clusters through Ray.

    from bi150_ray import PretrainJob, load_config
    result = PretrainJob(load_config("my_job.json")).run()   # on the cluster at RAY_ADDRESS

Names are imported lazily, so `import bi150_ray.topology` (ground floor) stays standard-library only.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "bi150_ray.config",
    "JobConfig": "bi150_ray.config",
    "RuntimeConfig": "bi150_ray.config",
    "load_config": ("bi150_ray.config", "load"),
    "JobResult": "bi150_ray.driver",
    "PretrainJob": "bi150_ray.driver",
    "GangError": "bi150_ray.errors",
    "RunFailed": "bi150_ray.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'bi150_ray' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(import_module(module), attr)
