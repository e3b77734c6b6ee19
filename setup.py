"""ddm_jax: diffusion models as latent-variable models, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ddm_jax",
    version="0.1.0",
    description="Variational diffusion models, DDPM and adapters in JAX/Flax.",
    packages=find_packages(include=["ddm_jax", "ddm_jax.*"]),
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
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "packaging>=23"],
        "experiments": ["matplotlib>=3.8,<4"],  # the plots in experiments/results
    },
)
