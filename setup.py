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
        "next_song_task",
        "audio_task",
        "baselines",
        "audio_reader",
        "audio_windows",
        "audio_ranking",
        "audiomodel",
        "priors",
        "blend",
        "hitrate",
        "cluster",
        "errors",
        "rundir",
        "kernels",
        "serving",
        "names",
        "server",
        "importer",
        "flagspec",
        "neighbours",
        "coldstart",
        "songrows",
        "warmstart",
        "transitions",
        "repeats",
        "recurrent",
    ],
    install_requires=[
        "tensorflow>=2.16",
        # kernels.FusedAdam overrides private Adam methods (_clip_gradients, _momentums, ...):
        # only the Keras releases it is tested on (tests/test_softmax.py checks that API).
        "keras>=3.15,<3.16",
        "numpy",
        "scipy",  # sparse matrices for the vectorised Markov and session-kNN baselines
        "pandas",
        "absl-py",
        "tensorboard",
        "matplotlib",
        "fastapi",  # --mode=serve: the HTTP endpoints, JSON errors (server.py)
        "uvicorn",  # --mode=serve: the ASGI server that runs them
    ],
    # selenium: the page's browser test drives Debian's chromium + chromium-driver (.ci/run).
    extras_require={
        # pytest-xdist: the suite runs its test files on every core (pyproject.toml's addopts)
        "test": ["pytest", "pytest-xdist", "hypothesis", "ruff", "selenium"]
    },
    # the page of --mode=serve: beside server.py in a checkout, in <prefix>/share/deepcf/web/
    # when installed (server.page_path looks in both)
    data_files=[("share/deepcf/web", ["web/index.html"])],
    entry_points={"console_scripts": ["deepcf=deepcf:run"]},
)
