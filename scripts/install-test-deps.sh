#!/usr/bin/env bash
# Installs what the test suite needs when missing, from Debian: redis-server
# and redis-tools for the redis-benchmark test, prometheus for promtool,
# which checks the /metrics exposition, chromium for the status page test,
# systemd for systemd-analyze, postgresql and openssl for the health checks
# that speak PostgreSQL and TLS; and kubernetes-validate from PyPI.
# Uses apt-get: needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing test dependencies: ${need[*]}"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "warning: cannot install ${need[*]} (not root, no sudo): the tests that need them will be skipped" >&2
    fi
fi

# kubernetes-validate (PyPI) checks the manifests in docs/kubernetes.md.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing test dependency: kubernetes-validate (PyPI)"
    python3 -m pip install --quiet --root-user-action=ignore kubernetes-validate ||
        echo "warning: cannot install kubernetes-validate: the manifest test will be skipped" >&2
fi
