#!/usr/bin/env bash
# Builds localhost/kube-proxy-py:<version> and tags it :latest, with podman, from this
# checkout: the base (build-base.sh, from Debian's packages), the wheels of the package
# and its dependencies (pip wheel), then manifests/image/Containerfile.
# Nothing is rebuilt when the base, the sources and the Containerfile are unchanged.
#   bash manifests/image/build.sh          (PYTHON=… picks the Python that builds wheels)
set -euo pipefail
cd "$(dirname "$0")/../.."
python="${PYTHON:-python3}"
version="$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
image="localhost/kube-proxy-py"
base="$(bash manifests/image/build-base.sh)"
source_hash="$( (echo "$base"; tar c --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
  --exclude=__pycache__ pyproject.toml README.md proxy manifests/image) | sha256sum | cut -c1-16)"
label=io.kube-proxy-py.source
if podman image exists "$image:$version" && [ "$(podman image inspect --format "{{index .Labels \"$label\"}}" "$image:$version")" = "$source_hash" ]; then
  podman tag "$image:$version" "$image:latest"
  echo "$image:$version is up to date (sources $source_hash)"
  exit 0
fi
# The image runs Debian's python3 (3.11): the wheels must be built for that version.
"$python" - <<'PY'
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) else f"build.sh: wheels need Python 3.11 (the image's), this is {sys.version.split()[0]}; set PYTHON=")
PY
wheels=build/image/wheels
rm -rf build/image && mkdir -p "$wheels" build/image/context
t0=$(date +%s)
PIP_DISABLE_PIP_VERSION_CHECK=1 "$python" -m pip wheel -q --wheel-dir "$wheels" . pip 2>&1 | grep -v "is ignored" || true
ls "$wheels"/kube_proxy_py-*.whl >/dev/null
# Binary wheels ship unstripped shared objects (uvloop: 13.6 MB, 1.6 MB stripped).
"$python" manifests/image/strip_wheels.py "$wheels"
podman build --quiet --pull=never --layers=false \
  --build-arg BASE="$base" --build-arg VERSION="$version" \
  --label "$label=$source_hash" \
  --volume "$PWD/$wheels:/wheels:ro" \
  -f manifests/image/Containerfile -t "$image:$version" build/image/context >/dev/null
podman tag "$image:$version" "$image:latest"
podman image prune -f >/dev/null 2>&1 || true  # the previous build's now untagged image
size="$(podman image inspect --format '{{.Size}}' "$image:$version")"
echo "built $image:$version (and :latest) in $(( $(date +%s) - t0 ))s: $(( size / 1000000 )) MB, base $base"
