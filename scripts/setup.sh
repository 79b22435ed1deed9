# Sourced by scripts/test.sh, demo.sh and mount.sh: apt packages + .venv, both idempotent.
# python3-venv/-dev: a fresh Debian 12 has neither, and pyfuse3 builds from source (no wheel).
# openssl: the Bearer token server in the tests signs JWTs with it.
APT_PACKAGES=(python3 python3-venv python3-dev fuse3 libfuse3-dev pkg-config gcc openssl ca-certificates
  tar util-linux docker-registry containerd runc
  stargz-snapshotter erofs-utils golang-go golang-github-containerd-containerd-dev
  golang-github-coreos-bbolt-dev bindfs)

stargzfs_setup() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "setup: installing apt packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi
  # The venv is built on Debian's python3 (the interpreter the packages above install and
  # python3-dev's headers belong to) unless PYTHON names another. Whichever python3 comes
  # first on PATH may be a build without PGO/LTO: a pyenv 3.11.7 (--enable-shared, no
  # --enable-optimizations) ran `stargzfs-image create` ~25% slower than Debian's 3.11.2.
  local py=${PYTHON:-/usr/bin/python3} which='import sys; print(sys.base_prefix, sys.version)'
  if [ -x .venv/bin/python ] && [ "$(.venv/bin/python -c "$which")" != "$("$py" -c "$which")" ]; then
    echo "setup: .venv was built on another interpreter; rebuilding it on $py" >&2
    rm -rf .venv
  fi
  if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
  fi
  # The stamp names the install mode too, so a venv made the older way is reinstalled.
  local stamp=.venv/.stargzfs-installed want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) editable_mode=compat"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing stargzfs into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >&2 || true
    # compat: a .pth that puts the checkout on sys.path, as a wheel install would leave no
    # import hook behind. The default (lenient) mode installs a finder that every Python
    # start imports (~20 ms per CLI, builder and test subprocess). setuptools calls compat
    # transitional, so fall back to the default if a future one refuses it.
    if ! .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat >&2; then
      echo "setup: editable_mode=compat refused; installing with the default editable mode" >&2
      .venv/bin/python -m pip install -q -e '.[test]' >&2
    fi
    echo "$want" > "$stamp"
  fi
  # Byte-compile the package as a wheel install would: the mount starts builder and CLI
  # processes, and with PYTHONDONTWRITEBYTECODE set nothing else writes the .pyc files, so
  # each one would compile every module it imports (~30 ms per process). Only stale ones
  # are rewritten.
  .venv/bin/python -m compileall -q stargzfs >/dev/null
}
stargzfs_setup
