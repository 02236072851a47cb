#!/usr/bin/env bash
# worldgen on a GPU machine with no network (a lent or air-gapped node whose image already has
# torch, numpy, einops, safetensors, msgpack, tqdm, pillow, imageio, matplotlib, torchmetrics):
# bundle the rest here, carry the folder over, install there.
#
#   bash benchmarks/offline_wheels.sh bundle DIR [PYTHON_VERSION]   # here, with PyPI (default 3.12)
#   bash benchmarks/offline_wheels.sh install DIR                    # there, in the repository root
#
# The bundle is about 20 MB: gymnasium, websockets and ViZDoom, whose wheel (39 MB) is repacked
# as an xz tarball without freedoom2.wad (worldgen plays freedoom1.wad). pygame-ce and
# imageio-ffmpeg are left out: training, eval and the benchmarks run without a window or video
# (pass --no-media). `install` puts them in /tmp/site, adds it to the interpreter's path with a
# .pth file and installs worldgen editable without dependencies.
set -euo pipefail
verb=${1:?usage: offline_wheels.sh bundle|install DIR [PYTHON_VERSION]}
dir=${2:?usage: offline_wheels.sh bundle|install DIR [PYTHON_VERSION]}
case "$verb" in
  bundle)
    py=${3:-3.12}
    mkdir -p "$dir"
    for pkg in vizdoom gymnasium farama-notifications websockets; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$pkg"
    done
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m zipfile -e "$dir"/vizdoom-*.whl "$tmp"
    rm -f "$tmp"/vizdoom/freedoom2.wad
    chmod +x "$tmp"/vizdoom/vizdoom  # the game binary (zipfile drops the mode bits)
    tar cJf "$dir/vizdoom.tar.xz" -C "$tmp" .
    rm "$dir"/vizdoom-*.whl
    du -sh "$dir" ;;
  install)
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$dir"/*.whl
    tar xJf "$dir/vizdoom.tar.xz" -C /tmp/site
    echo /tmp/site > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/worldgen_offline.pth"
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    python3 -c "import vizdoom, gymnasium, websockets, worldgen; print('worldgen installed offline')" ;;
  *) echo "verb must be bundle or install" >&2; exit 2 ;;
esac
