"""Only the optional C extension lives here; everything else is in pyproject.toml.

``optional=True``: where no C compiler is installed (a BI150 node may lack one), the build goes on
without it and ``bi150_ray.data.kernels`` falls back to NumPy (same plan, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bi150_ray.data._kernels",
            sources=["bi150_ray/data/_kernels.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
