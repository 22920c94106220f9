#!/bin/bash
# Install (or upgrade) muxd as a systemd service. Run as root on a systemd host:
#   sudo packaging/install.sh
# - the package goes into its own venv at /opt/muxd (reinstalled on every run),
# - the units go into /etc/systemd/system/,
# - the config goes to /etc/muxd/muxd.ini only if there is none yet; an existing one is kept
#   and the new default is written beside it as /etc/muxd/muxd.ini.dist.
# Offline installs: export PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheelhouse first.
# Nothing is enabled or started; see "Run it as a service" in README.md for that.
set -euo pipefail

PREFIX=/opt/muxd
CONF_DIR=/etc/muxd
UNIT_DIR=/etc/systemd/system
PYTHON=${PYTHON:-python3}

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# The repo is wherever this script lives, whatever the caller's current directory.
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(dirname -- "$script_dir")

[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ -f $repo/pyproject.toml ]] || die "no pyproject.toml in $repo (is this script inside a muxd tree?)"
[[ -f $repo/config/muxd.ini ]] || die "no default config at $repo/config/muxd.ini"
for unit in muxd.service muxd.socket; do
    [[ -f $script_dir/$unit ]] || die "missing $script_dir/$unit"
done
command -v systemctl >/dev/null || die "systemctl not found: this is not a systemd host"
# sd_booted(3): installing into an image or chroot works, only the reload is left for later.
systemd_running=no
[[ -d /run/systemd/system ]] && systemd_running=yes
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than 3.11"

# The daemon runs as a dynamic user, so everything it reads must be world-readable whatever
# umask root happens to have.
umask 022

# Build from a scratch copy: the source may be read-only or an exported tree without .git,
# and an in-tree build would leave build/ and *.egg-info behind in it.
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
tar -C "$repo" -cf - \
    --exclude=.git --exclude=.venv --exclude=venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.ruff_cache --exclude=.hypothesis \
    . | tar -C "$work" -xf -

if [[ -x $PREFIX/bin/pip ]]; then
    say "upgrading the existing venv in $PREFIX"
else
    say "creating a venv in $PREFIX"
    "$PYTHON" -m venv "$PREFIX"
fi
# --force-reinstall so an upgrade to the same version number still installs the new code.
"$PREFIX/bin/pip" install --disable-pip-version-check --no-cache-dir --force-reinstall \
    --quiet "$work" || die "pip install failed (offline? set PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR)"
"$PREFIX/bin/muxd" --version >/dev/null || die "$PREFIX/bin/muxd does not run"
say "installed $("$PREFIX/bin/muxd" --version) into $PREFIX"

install -d -m 0755 "$CONF_DIR"
if [[ -e $CONF_DIR/muxd.ini ]]; then
    install -m 0644 "$repo/config/muxd.ini" "$CONF_DIR/muxd.ini.dist"
    say "kept the existing $CONF_DIR/muxd.ini; the new default is $CONF_DIR/muxd.ini.dist"
else
    install -m 0644 "$repo/config/muxd.ini" "$CONF_DIR/muxd.ini"
    say "installed the default config as $CONF_DIR/muxd.ini"
fi
if ! "$PREFIX/bin/muxd" --check-config --config "$CONF_DIR/muxd.ini"; then
    say "warning: $CONF_DIR/muxd.ini does not pass --check-config; fix it before starting muxd"
fi

for unit in muxd.service muxd.socket; do
    install -m 0644 "$script_dir/$unit" "$UNIT_DIR/$unit"
done
if [[ $systemd_running == yes ]]; then
    systemctl daemon-reload
    say "installed muxd.service and muxd.socket into $UNIT_DIR and reloaded systemd"
    for unit in muxd.service muxd.socket; do
        if systemctl is-active --quiet "$unit"; then
            say "$unit is running the old code: 'systemctl restart $unit' to switch to the new one"
        fi
    done
else
    say "installed muxd.service and muxd.socket into $UNIT_DIR" \
        "(systemd is not running here: no daemon-reload needed until it boots)"
fi
say "next: enable ONE of them, e.g. 'systemctl enable --now muxd.service'" \
    "or 'systemctl enable --now muxd.socket' (see \"Run it as a service\" in README.md)"
