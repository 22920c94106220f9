#!/bin/bash
# Remove muxd installed by packaging/install.sh. Run as root:
#   sudo packaging/uninstall.sh           # keeps /etc/muxd (your config)
#   sudo packaging/uninstall.sh --purge   # removes /etc/muxd too
set -euo pipefail

PREFIX=/opt/muxd
CONF_DIR=/etc/muxd
UNIT_DIR=/etc/systemd/system

say() { printf 'uninstall.sh: %s\n' "$*"; }
die() { printf 'uninstall.sh: error: %s\n' "$*" >&2; exit 1; }

purge=no
for arg in "$@"; do
    case $arg in
        --purge) purge=yes ;;
        -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (only --purge is known)" ;;
    esac
done
[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v systemctl >/dev/null || die "systemctl not found: this is not a systemd host"

systemd_running=no
[[ -d /run/systemd/system ]] && systemd_running=yes

# The socket first: stopping only the service would let the next connection start it again.
for unit in muxd.socket muxd.service; do
    [[ -e $UNIT_DIR/$unit ]] || continue
    if [[ $systemd_running == yes ]]; then
        systemctl disable --now "$unit"
        say "stopped and disabled $unit"
    else
        # Offline (image, chroot): disable only removes the [Install] symlinks.
        systemctl --root=/ disable "$unit"
    fi
done
for unit in muxd.service muxd.socket; do
    rm -f -- "$UNIT_DIR/$unit"
done
# Drop-ins made with 'systemctl edit' belong to the units being removed.
rm -rf -- "$UNIT_DIR/muxd.service.d" "$UNIT_DIR/muxd.socket.d"
if [[ $systemd_running == yes ]]; then
    systemctl daemon-reload
    systemctl reset-failed muxd.service muxd.socket 2>/dev/null || true
fi
say "removed the units from $UNIT_DIR"

rm -rf -- "$PREFIX"
say "removed $PREFIX"

if [[ $purge == yes ]]; then
    rm -rf -- "$CONF_DIR"
    say "removed $CONF_DIR (--purge)"
elif [[ -d $CONF_DIR ]]; then
    say "kept $CONF_DIR (use --purge to remove it)"
fi
