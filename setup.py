"""dera-t5x: decoding-time realignment (DeRa) of T5 models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="dera-t5x",
    version="0.1.0",
    description="Decoding-time realignment of language models, reproduced in JAX/Flax "
                "the way T5X would have done it.",
    packages=setuptools.find_packages(include=["dera_t5x", "dera_t5x.*"]),
    python_requires=">=3.11",
    install_requires=[
        "absl-py==2.5.1",
        "flax==0.12.8",
        "gin-config==0.5.0",
        "jinja2==3.1.6",
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "matplotlib==3.11.2",
        "msgpack==1.2.4",
        "numpy==2.4.6",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "rouge-score==0.1.2",
        "safetensors==0.8.0",
        "sentencepiece==0.2.3",
        "seqio==0.0.20",
        "tensorflow==2.21.0",
        "tensorflow-datasets==4.9.10",
        "tensorboard==2.21.0",
        "tensorflow-text==2.21.1",
        "tensorstore==0.1.86",
        "tokenizers==0.23.3",
        "tqdm==4.70.1",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "torch==2.13.0",
            "transformers==5.23.0",
        ],
    },
)
