#!/usr/bin/env bash
# The default base image, made from Debian's packages with no registry: a bookworm
# minbase (mmdebstrap) with Debian's python3 and the node tools, without docs, man pages
# and locales, imported into podman as localhost/kube-proxy-py-base:<hash of this file>.
#   bash manifests/image/build-base.sh [MIRROR]      (prints the image name)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mirror="${1:-http://deb.debian.org/debian}"
tag="$(sha256sum "$here/build-base.sh" | cut -c1-12)"
image="localhost/kube-proxy-py-base:$tag"
if podman image exists "$image"; then
  echo "$image"
  exit 0
fi
work="$(mktemp -d /tmp/kpp-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
# essential: the Essential:yes set (minbase less apt, which a final image needs not);
# merged-usr through mmdebstrap's hook, not the usrmerge package (which pulls in perl).
# python3 is Debian's (no venv: one interpreter); iptables brings both backends. PATH:
# mmdebstrap's filters run with the python3 first on it.
PATH=/usr/sbin:/usr/bin:/sbin:/bin mmdebstrap --variant=essential --quiet \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include=python3,iptables,nftables,conntrack,iproute2,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt='path-exclude=/usr/share/bash-completion/*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*' \
  --dpkgopt='path-exclude=/usr/share/zoneinfo/*' \
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
  bookworm "$work/rootfs.tar" "$mirror" >&2
podman import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  "$work/rootfs.tar" "$image" >/dev/null
# Earlier bases (this file changed) are no use any more.
podman images --format '{{.Repository}}:{{.Tag}}' localhost/kube-proxy-py-base \
  | grep -vx "$image" | xargs -r podman rmi >/dev/null 2>&1 || true
echo "$image"
