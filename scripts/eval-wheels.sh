#!/usr/bin/env bash
# Fetch, for the GPU machine (Python 3.12, x86-64, no network there), the wheels of lm-evaluation-harness
# and of those of its runtime dependencies that its image lacks, into a folder you ignore in git and
# carry along beside the one of ../shared/tools/gpu-wheels.sh (.whl: datasets, dill, multiprocess, hydra).
# Usage: scripts/eval-wheels.sh [.whl-eval]     then on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl-eval/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
# Environment: PYTHON (default python3), LM_EVAL_VERSION (default 0.4.13, the version tested).
set -euo pipefail
dest=${1:-.whl-eval}
py=${PYTHON:-python3}
version=${LM_EVAL_VERSION:-0.4.13}
mkdir -p "$dest"
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"

# Published as source archives only: build their pure-Python wheels here, where the resolver below finds them.
"$py" -m pip wheel -q --no-deps -w "$dest" rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1

# lm-eval and its whole dependency closure, as binary wheels for CPython 3.12 on x86-64 Linux.
# shellcheck disable=SC2086
"$py" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 $plat \
  --find-links "$dest" -d "$dest" "lm-eval==$version"

# The GPU image's Python packages (its package list as read on the machine), and what gpu-wheels.sh carries.
IMAGE="
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp
datasets dill multiprocess hydra-core omegaconf antlr4-python3-runtime submitit hydra-submitit-launcher
"
# Keep only the wheels that lm-eval needs through wheels not already there: the image's own packages go,
# and so do the dependencies of the newer releases of them that the resolver fetched. Then check that
# every requirement of what is kept is met by the kept wheels or the image.
IMAGE="$IMAGE" "$py" - "$dest" <<'PY'
import os
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
image = {norm(n) for n in os.environ["IMAGE"].split()}
dest = Path(sys.argv[1])
wheels = {norm(w.name.split("-")[0]): w for w in dest.glob("*.whl")}


def requires(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = set()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.add(norm(req.name))
    return out


keep, todo = set(), ["lm-eval"]
while todo:
    name = todo.pop()
    if name in keep or name in image:
        continue
    if name not in wheels:
        sys.exit(f"eval-wheels: no wheel for {name}, which is not in the GPU image either")
    keep.add(name)
    todo += sorted(requires(wheels[name]))
for name, wheel in wheels.items():
    if name not in keep:
        wheel.unlink()
print(f"kept {len(keep)} wheels; every requirement is met by them or by the GPU image")
PY
ls -1 "$dest"
du -sh "$dest"
