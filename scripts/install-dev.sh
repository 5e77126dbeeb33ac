#!/usr/bin/env bash
# Installs everything the tests need: the Python requirements (torch from the pinned wheels) and
# Debian's chromium for the end-to-end browser test (skipped with a reason where it can't be had).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt -e .
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
if ! command -v dciodvfy >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dicom3tools >/dev/null) \
    || echo "warning: could not install dicom3tools; the DICOM validator test will be skipped" >&2
fi
