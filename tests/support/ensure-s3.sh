#!/usr/bin/env bash
# Installs the S3-compatible test server (s3s-fs 0.14.1, from crates.io) if it is missing. It
# checks request signatures and honours conditional writes; newer versions need a newer rustc.
set -euo pipefail
bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q '0.14.1'; then
  exit 0
fi
echo "ensure-s3: installing s3s-fs 0.14.1 (a few minutes, once per machine)" >&2
cargo install s3s-fs@0.14.1 --features binary --locked --quiet
