#!/usr/bin/env bash
# Provides a real Kubernetes API server for tests, offline: etcd plus the upstream
# k8s.io/apiextensions-apiserver (serves CRDs and custom resources with real list/watch),
# built from Debian sid's Go sources through a private apt configuration.
# The first run downloads ~370 MB and builds for ~4 min; later runs reuse the cached binaries.
# Prints the directory holding `apiextensions-apiserver`, `etcd` and `kubectl`.
set -euo pipefail

cache="${CONSUL_SMI_CACHE:-$HOME/.cache/consul-smi}"
out="$cache/kube-bin"
mkdir -p "$cache"
# Test binaries may start API servers in parallel; only one of them may build.
exec 9>"$cache/build-apiserver.lock"
flock 9
if [ -x "$out/apiextensions-apiserver" ] && [ -x "$out/etcd" ] && [ -x "$out/kubectl" ]; then
  echo "$out"; exit 0
fi

for tool in curl openssl; do
  command -v "$tool" >/dev/null || { echo "build-apiserver: '$tool' is required (apt-get install curl openssl)" >&2; exit 1; }
done

work="$cache/kube-build"
apt_dir="$work/apt-sid"
root="$work/root"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$root" "$out"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" > "$apt_dir/sources.list"
: > "$apt_dir/status"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::State::status=$apt_dir/status"
  -o "APT::Sandbox::User=root"
  -o "Debug::NoLocking=1"
)
echo "build-apiserver: downloading Go sources, etcd and kubectl from Debian sid" >&2
apt-get "${apt_opts[@]}" update >&2
apt-get "${apt_opts[@]}" -y install --download-only \
  golang-k8s-apiextensions-apiserver-dev golang-1.27-go etcd-server kubectl >&2

echo "build-apiserver: extracting" >&2
for deb in "$apt_dir"/cache/archives/golang-*.deb "$apt_dir"/cache/archives/etcd-server_*.deb "$apt_dir"/cache/archives/kubectl_*.deb; do
  dpkg-deb -x "$deb" "$root"
done

go="$(ls -d "$root"/usr/lib/go-1.*/bin/go | sort -V | tail -n1)"
src="$root/usr/share/gocode/src/k8s.io/apiextensions-apiserver"
ver="$(basename "$(ls "$apt_dir"/cache/archives/golang-k8s-apiextensions-apiserver-dev_*.deb)" | sed -E 's/.*_0\.([0-9]+)\.([0-9]+).*/\1 \2/')"
minor="${ver% *}"; patch="${ver#* }"
echo "build-apiserver: building apiextensions-apiserver v1.$minor.$patch (several minutes on 2 cores)" >&2
(
  cd "$src"
  export GO111MODULE=off GOTOOLCHAIN=local GOPROXY=off CGO_ENABLED=0 \
    GOPATH="$root/usr/share/gocode" GOCACHE="$work/gocache" GOFLAGS=-mod=mod
  unset GOFLAGS
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v1.$minor.$patch -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  "$go" build -o "$out/apiextensions-apiserver" -ldflags "$ldflags" .
)
cp "$(find "$root" -type f -name etcd -path '*bin*' | head -n1)" "$out/etcd"
cp "$(find "$root" -type f -name kubectl -path '*bin*' | head -n1)" "$out/kubectl"
chmod +x "$out"/*
# The sources and caches are ~4 GB; only the three binaries are needed from here on.
if [ -z "${CONSUL_SMI_KEEP_KUBE_BUILD:-}" ]; then rm -rf "$work"; fi
echo "$out"
