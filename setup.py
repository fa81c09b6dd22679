"""pixel_llm: Pixel Aligned Language Models (Xu et al., CVPR 2024) in JAX/Flax.

Install (a fresh machine, the verified versions):
  pip install -e . -c requirements/constraints.txt
  pip install -e '.[test]' -c requirements/constraints.txt   # + pytest and the torch parity stack
"""
import setuptools

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "ml-collections>=1.1.0",
    "absl-py>=2.5.1",
    "numpy>=2.0",
    "seqio>=0.0.20",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10",
    "sentencepiece>=0.2.3",
    "clu>=0.0.12",
    "tensorboard>=2.21",  # clu.metric_writers needs it; TF 2.21 no longer pulls it in.
    "pillow>=11",
    "safetensors>=0.8.0",  # weight converters read safetensors without torch.
]

EXTRAS = {
    # Reference implementations for parity tests.  torch 2.13.0 is the CPU wheel; torchvision is
    # pinned to the only release built for it (see tests/conftest.py for the import shim).
    "test": [
        "pytest>=9",
        "pytest-xdist>=3.8",
        "torch==2.13.0",
        "torchvision==0.28.0",
        "transformers>=5.24",
        "timm>=1.0.31",
        # Parity of pixel_llm.metrics with the COCO caption toolkit (bundles the METEOR 1.5 jar).
        "pycocoevalcap>=1.2",
        # Ahead-of-time compiles for TPU topologies on CPU (pixel_llm.tools.aot, tests/test_aot.py):
        # the libtpu that jax[tpu]==0.10.2 pins.
        "libtpu==0.0.42.1; sys_platform == 'linux'",
    ],
    "eval": ["pycocotools>=2.0.11", "pycocoevalcap>=1.2"],
    "gpu": ["jax[cuda13]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
}

setuptools.setup(
    name="pixel_llm",
    version="0.1.0",
    description="PixelLLM (Pixel Aligned Language Models) in JAX/Flax: train, evaluate, run.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["pixel_llm", "pixel_llm.*", "configs"]),
    package_data={"pixel_llm.models": ["manifests/*.json"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
