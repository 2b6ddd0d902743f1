#!/usr/bin/env bash
# Installs a Consul binary for tests and the demo, without touching the system's apt config.
# Consul is not in Debian bookworm; bullseye packages 1.8.7. Elsewhere, put any consul on
# PATH or set CONSUL_BIN and this script does nothing.
# Prints the path of the consul binary on stdout.
set -euo pipefail

cache="${CONSUL_SMI_CACHE:-$HOME/.cache/consul-smi}"
root="$cache/consul-root"
bin="$root/usr/bin/consul"

if [ -n "${CONSUL_BIN:-}" ] && [ -x "$CONSUL_BIN" ]; then echo "$CONSUL_BIN"; exit 0; fi
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
if command -v consul >/dev/null 2>&1; then command -v consul; exit 0; fi

mkdir -p "$cache"
# Tests start agents in parallel; only one of them may install.
exec 9>"$cache/install-consul.lock"
flock 9
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

apt_dir="$cache/apt-bullseye"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$root"
echo "deb http://deb.debian.org/debian bullseye main" > "$apt_dir/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o "APT::Sandbox::User=root"
)
echo "installing consul 1.8.7 from Debian bullseye into $root" >&2
apt-get "${apt_opts[@]}" update >&2
(cd "$apt_dir" && apt-get "${apt_opts[@]}" download consul >&2)
dpkg-deb -x "$(ls "$apt_dir"/consul_*.deb | head -n1)" "$root"
"$bin" version >&2
echo "$bin"
