#!/usr/bin/env bash
# Installs promtool (Debian's prometheus package) if it is missing: the alert rules are
# checked and unit-tested with it.
set -euo pipefail
command -v promtool >/dev/null 2>&1 && exit 0
echo "ensure-prometheus: installing prometheus (for promtool)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null
