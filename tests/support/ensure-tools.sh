#!/usr/bin/env bash
# Installs, from Debian's packages, the real tools the tests check our files with when they
# are missing: Prometheus and promtool (scrape config, alert rules, the dashboards' PromQL)
# and systemd-analyze (the systemd unit, offline).
set -euo pipefail
missing=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "ensure-tools: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v systemd-analyze >/dev/null
