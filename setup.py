"""ddm_jax: diffusion models as latent-variable models, in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="ddm_jax",
    version="0.1.0",
    description="Variational diffusion models, DDPM and adapters in JAX/Flax.",
    packages=find_packages(include=["ddm_jax", "ddm_jax.*"]),
    # The CLIP BPE vocabulary (open-clip-torch's, MIT licence) and its licence notice.
    package_data={"ddm_jax.models": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        # jaxlib 0.10.2 miscompiles reductions over constant matrices on CPU
        # (XLA's experimental YNN fusion); tests/test_miscompile_guard.py.
        "jax>=0.9.2,!=0.10.2,<0.11",
        "jaxlib>=0.9.2,!=0.10.2,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "tensorflow-datasets>=4.9.6,<5",
        "tensorflow-cpu>=2.18,<2.22",
        "tensorboard>=2.18,<2.22",
        "clu>=0.0.12,<0.1",
        "diffrax>=0.7,<0.8",
        "absl-py>=2.0",
        "numpy>=1.26,<3",
        "scikit-learn>=1.4,<2",
        "pillow>=10",
        # tfds 4.9.10 imports it unconditionally (tensorflow/datasets#11212).
        "importlib_resources>=5",
        "psutil>=5",
        "regex>=2023",  # the CLIP tokenizer's Unicode-class pattern
        "safetensors>=0.8,<1",  # diffusers-format checkpoints, read and written without torch
        "ml_dtypes>=0.5",  # bfloat16 tensors of those checkpoints in numpy
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "scipy>=1.11",
            "packaging>=23",
            "ruff==0.17.6",  # `make lint`: the one formatter and linter
            "instant-clip-tokenizer>=0.1.1",  # an independent CLIP tokenizer to test ours against
        ],
        "experiments": ["matplotlib>=3.8,<4"],  # the plots in experiments/results
        # Only experiments/make_parity_fixtures.py: PyTorch references for tests/fixtures (never `make test`).
        # torch 2.13.0's CPU wheel; `pip install torch` alone may fetch a CUDA build of several GB.
        "parity": ["torch==2.13.0", "diffusers>=0.42,<0.43", "transformers>=5.24,<6"],
    },
)
