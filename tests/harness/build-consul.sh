#!/usr/bin/env bash
# Provides a real Consul 1.9+ (1.14.11, the config-entry intention API) for tests, built from
# the github.com/hashicorp/consul Go module through our wrapper module in consul-go/ (see its
# go.mod for why this version). Needs Go and the Go module proxy; the first run downloads
# ~400 MB of modules and builds for ~8 min on 2 cores; later runs reuse the cached binary.
# A consul >= 1.9 already given as CONSUL_MODERN_BIN is used as it is.
# Prints the path of the consul binary on stdout.
set -euo pipefail

if [ -n "${CONSUL_MODERN_BIN:-}" ] && [ -x "$CONSUL_MODERN_BIN" ]; then echo "$CONSUL_MODERN_BIN"; exit 0; fi

here="$(cd "$(dirname "$0")" && pwd)"
version=1.14.11
cache="${CONSUL_SMI_CACHE:-$HOME/.cache/consul-smi}"
out="$cache/consul-$version"
bin="$out/consul"
mkdir -p "$cache"
# Test binaries may start agents in parallel; only one of them may build.
exec 9>"$cache/build-consul.lock"
flock 9
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "build-consul: Go is required to build Consul $version" >&2; exit 1; }
echo "build-consul: building consul $version from its Go module (several minutes on 2 cores)" >&2
mkdir -p "$out"
(
  cd "$here/consul-go"
  # go.sum pins every module; the machine's own Go builds it (no toolchain download).
  GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -o "$bin.tmp" .
)
mv "$bin.tmp" "$bin"
"$bin" version >&2
echo "$bin"
