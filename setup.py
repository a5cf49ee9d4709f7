"""Package metadata for deepcf (flat modules, no package directory)."""

from setuptools import setup

setup(
    name="deepcf",
    version="0.1.0",
    description="Sequential music recommendation with recurrent networks (TensorFlow 2 / Keras 3).",
    python_requires=">=3.10",
    py_modules=[
        "deepcf",
        "config",
        "yes_reader",
        "musicmodel",
        "modeltrainer",
        "hooks",
        "metrics",
        "tasks",
        "baselines",
        "audio_reader",
        "hitrate",
        "audio_task",
        "cluster",
    ],
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "numpy",
        "scipy",  # sparse matrices for the vectorised Markov and session-kNN baselines
        "pandas",
        "absl-py",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "hypothesis", "ruff"]},
    entry_points={"console_scripts": ["deepcf=deepcf:run"]},
)
