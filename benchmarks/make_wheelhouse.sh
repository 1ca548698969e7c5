#!/usr/bin/env bash
# Build the wheelhouse that benchmarks/gpu_suite.sh installs on a GPU machine without network access.
#
# The GPU image has Python 3.12, torch with CUDA and most of our dependencies, but no DeepSpeed. This
# script, run on a machine WITH network access from the project root, writes into DIR (default .whl/,
# git-ignored):
#   - a DeepSpeed wheel built from its source distribution with no ops compiled in (DS_BUILD_OPS=0), so
#     it is pure Python and installs on any CPython; its ops (FusedAdam) JIT-build on the GPU machine;
#   - the binary wheels DeepSpeed needs that the image lacks (hjson, pydantic and its parts), picked for
#     CPython 3.12 (PYVER) on manylinux x86_64.
# usage: benchmarks/make_wheelhouse.sh [DIR]   (PY=python to use, DS_VERSION=x.y.z to pin, PYVER=3.11 for a
#        CPU rehearsal of benchmarks/gpu_suite.sh --smoke under a local Python 3.11)
set -euo pipefail
dir=${1:-.whl}
py=${PY:-.venv/bin/python}
pyver=${PYVER:-3.12}
abi=cp${pyver/./}
version=${DS_VERSION:-$("$py" -m pip show deepspeed 2>/dev/null | sed -n 's/^Version: //p')}
if [ -z "$version" ]; then
  echo "make_wheelhouse.sh: cannot tell the DeepSpeed version; set DS_VERSION" >&2
  exit 2
fi
mkdir -p "$dir"
rm -f "$dir"/*.whl

echo "> dependency wheels for $abi manylinux x86_64"
"$py" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp --abi "$abi" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --dest "$dir" hjson pydantic annotated-types typing-inspection typing-extensions
# pydantic pins one pydantic-core version exactly: fetch that one.
core=$("$py" - "$dir" <<'PY'
import glob, sys, zipfile
whl = glob.glob(f"{sys.argv[1]}/pydantic-[0-9]*.whl")[0]
with zipfile.ZipFile(whl) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist: pydantic-core") or line.startswith("Requires-Dist: pydantic_core"):
            print(line.split(":", 1)[1].strip().split(";")[0].replace(" ", ""))
            break
PY
)
"$py" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp --abi "$abi" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --dest "$dir" "$core"

echo "> deepspeed==$version as a pure-python wheel (ops are JIT-built on the GPU machine)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary=:all: --dest "$work" "deepspeed==$version"
DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dir" \
  "$work"/deepspeed-*.tar.gz
ls -1 "$dir"
echo "> done: see docs/performance.md for the install line on the GPU machine"
