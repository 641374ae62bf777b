#!/usr/bin/env bash
# Prepare, here, what benchmarks/gpu_check.sh needs on the device machine, which reaches no network
# and does not see ../shared. Both folders are git-ignored (.device/) and travel with the device
# tool's `carry: [".device"]` (64 MiB in all with the working tree).
#   .device/jsrt     a copy of the JSRT data (JSRT_SOURCE, default ../shared/data/jsrt; about 25 MB)
#   .device/wheels   wheels for CPython 3.12 on manylinux x86_64 of the packages the device image lacks
#                    (diffusers, segmentation-models-pytorch, papermill and its kernel, ...), at the
#                    versions installed in .venv. The image has torch 2.11 + CUDA, torchvision, timm,
#                    scipy, statsmodels, pandas, pillow, tqdm, pyyaml, safetensors, huggingface-hub:
#                    gpu_check.sh installs the wheels with --no-deps, so torch is never reinstalled.
#
#   bash benchmarks/prepare_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SOURCE=${JSRT_SOURCE:-../shared/data/jsrt}

mkdir -p .device/jsrt .device/wheels
cp -a "$SOURCE"/. .device/jsrt/
echo "copied $SOURCE to .device/jsrt ($(du -sh .device/jsrt | cut -f1))"

# The project's run-time packages (its dependencies less the book builder) and everything they
# need, minus what the device image already has (its package list: /work/.library/device/KINDS.md).
PACKAGES=$($PY - <<'EOF'
import importlib.metadata as md
import re

from packaging.requirements import Requirement

DEVICE_HAS = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
ROOTS = ["diffusers", "segmentation-models-pytorch", "papermill", "nbformat", "nbclient", "ipykernel",
         "ipywidgets", "plotly", "tifffile", "filelock", "pyyaml"]
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


versions, stack = {}, list(ROOTS)
while stack:
    name = norm(stack.pop())
    if name in versions or name in DEVICE_HAS:
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise SystemExit(f"{name} is needed but not installed in this environment")
    versions[name] = dist.version
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(ENV):
            stack.append(requirement.name)
print(" ".join(f"{name}=={version}" for name, version in sorted(versions.items())))
EOF
)

PLATFORMS=()
for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_5 manylinux_2_12 manylinux_2_17 manylinux_2_24 \
    manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux_2_38 \
    manylinux_2_39; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
failed=()
for package in $PACKAGES; do
    name=${package%%==*}
    if compgen -G ".device/wheels/$(echo "$name" | tr - _)-${package##*==}-*.whl" >/dev/null ||
        compgen -G ".device/wheels/${name}-${package##*==}-*.whl" >/dev/null; then
        continue  # already downloaded
    fi
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .device/wheels "$package" || failed+=("$package")
done
echo "wheels in .device/wheels: $(ls .device/wheels | wc -l) ($(du -sh .device/wheels | cut -f1)); .device: $(du -sh .device | cut -f1)"
if ((${#failed[@]})); then
    echo "could not download: ${failed[*]}" >&2
    exit 1
fi
