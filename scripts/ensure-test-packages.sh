#!/usr/bin/env bash
# Installs the Debian packages the cross-language test needs (Python's grpcio
# and protobuf, and protoc), when they are missing. Called by `make test` and
# .ci/run, so a fresh machine gets them without a manual step. Without root
# (and without passwordless sudo) it only warns: that test then skips, except
# under CI=true, where it fails.
set -euo pipefail

packages=(python3-grpcio python3-protobuf protobuf-compiler)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
((${#missing[@]} == 0)) && exit 0

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "warning: cannot install ${missing[*]} (not root); the cross-language test will not run" >&2
    exit 0
  fi
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
