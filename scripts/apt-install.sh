#!/usr/bin/env bash
# Install Debian packages, as root or through sudo; used by the Makefile
# when a binary the tests or benchmarks need is missing.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$@"
