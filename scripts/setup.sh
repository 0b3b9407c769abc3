#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root): system packages,
# a virtualenv in .venv, and obdfuse installed into it (editable, with test extras).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    fuse3 libfuse3-dev pkg-config          # FUSE runtime and headers for pyfuse3
    e2fsprogs util-linux kmod             # mkfs.ext4, e2fsck, losetup, mount
    lz4 zstd                              # reference codec command-line tools
    docker-registry apache2-utils         # a real OCI registry for tests, htpasswd -B
    skopeo umoci                          # building plain OCI images for conversion tests
    tgt libiscsi-bin qemu-utils qemu-block-extra   # iSCSI reference target and initiators
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    [ "${p:0:1}" = "#" ] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian registry package starts a system service on install; tests start their own.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
    systemctl disable --now tgt >/dev/null 2>&1 || true
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.obdfuse-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
