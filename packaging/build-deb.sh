#!/bin/bash
# Build the Debian package from this tree with Debian's own tools, offline:
#   packaging/build-deb.sh [--no-lintian] [--version VERSION] [OUTDIR]
# writes OUTDIR/muxd_VERSION_all.deb; OUTDIR defaults to dist/ in this tree. Needs (Debian 12 or 13):
#   apt-get install --no-install-recommends build-essential debhelper dh-python \
#       pybuild-plugin-pyproject python3-all python3-setuptools scdoc lintian
# The version comes from muxd/__init__.py; packaging/debian/changelog must name the same one
# (record a release in the tree with `dch -v VERSION -c packaging/debian/changelog`, devscripts).
# --version VERSION builds the package as VERSION (e.g. 0.1.1, or 0.1.0+local1 for a local
# build of changed code) without touching the tree: the build copy's muxd/__init__.py says
# VERSION and its changelog gets a new entry for it, so that `apt install` sees an upgrade.
# VERSION may not be older than the changelog's newest entry.
# lintian -I --pedantic runs on the result and fails the build on any error or warning.
set -euo pipefail

say() { printf 'build-deb.sh: %s\n' "$*"; }
die() { printf 'build-deb.sh: error: %s\n' "$*" >&2; exit 1; }

lintian=yes
outdir=
wanted=
while (($#)); do
    case $1 in
        --no-lintian) lintian=no ;;
        --version) (($# > 1)) || die "--version needs a VERSION"; wanted=$2; shift ;;
        --version=*) wanted=${1#--version=} ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        -*) die "unknown option: $1" ;;
        *) [[ -z $outdir ]] || die "one OUTDIR only"; outdir=$1 ;;
    esac
    shift
done

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(dirname -- "$script_dir")
outdir=${outdir:-$repo/dist}
for tool in dpkg-buildpackage dpkg-parsechangelog dh scdoc; do
    command -v "$tool" >/dev/null || die "$tool not found (see the apt-get line in $0)"
done

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/muxd/__init__.py")
[[ -n $version ]] || die "no __version__ in $repo/muxd/__init__.py"
changelog_version=$(dpkg-parsechangelog -l "$script_dir/debian/changelog" -S Version)
if [[ -n $wanted ]]; then
    # A native package: no Debian revision (-), no epoch (:); and a version pip reads too.
    [[ $wanted =~ ^[0-9][0-9A-Za-z.+]*$ ]] \
        || die "--version $wanted: expected digits, letters, '.' and '+', starting with a" \
               "digit (e.g. 0.1.1 or 0.1.0+local1)"
    dpkg --compare-versions "$wanted" ge "$changelog_version" \
        || die "--version $wanted is older than packaging/debian/changelog's newest entry," \
               "$changelog_version: apt would not install it over that one"
    version=$wanted
elif [[ $changelog_version != "$version" ]]; then
    die "muxd/__init__.py says $version but packaging/debian/changelog says" \
        "$changelog_version: add a changelog entry for $version" \
        "(dch -v $version -c packaging/debian/changelog, from devscripts), or build with" \
        "--version $version, which writes one in the build's copy only"
fi

# A scratch copy with the packaging at debian/, so the tree itself gets no build output.
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
src=$work/muxd-$version
mkdir "$src"
tar -C "$repo" -cf - \
    --exclude=.git --exclude=.venv --exclude=venv --exclude=build --exclude=dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.ruff_cache --exclude=.hypothesis --exclude=bench/out --exclude=bench/build \
    --exclude=packaging/debian \
    . | tar -C "$src" -xf -
cp -r "$script_dir/debian" "$src/debian"
if [[ -n $wanted ]]; then
    sed -i "s/^__version__ = \".*\"\$/__version__ = \"$wanted\"/" "$src/muxd/__init__.py"
    if [[ $wanted != "$changelog_version" ]]; then
        # Signed like the entry before it unless DEBFULLNAME/DEBEMAIL say otherwise, as dch does.
        maintainer=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Maintainer)
        if [[ ${DEBEMAIL:-} == *'<'* ]]; then
            maintainer=$DEBEMAIL  # "Name <address>", which dch takes too
        elif [[ -n ${DEBEMAIL:-} ]]; then
            maintainer="${DEBFULLNAME:-${maintainer% <*}} <$DEBEMAIL>"
        fi
        { printf 'muxd (%s) unstable; urgency=medium\n\n' "$wanted"
          printf '  * Built as %s from this tree by packaging/build-deb.sh --version.\n\n' \
              "$wanted"
          printf ' -- %s  %s\n\n' "$maintainer" "$(LC_ALL=C date -R)"
          cat "$script_dir/debian/changelog"; } >"$src/debian/changelog"
    fi
fi

# A clean environment: a python3 earlier in PATH (pyenv, a venv) breaks pybuild.
clean_env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$work" LANG=C.UTF-8)
say "building muxd $version in $src"
(cd "$src" && "${clean_env[@]}" dpkg-buildpackage -us -uc -b) >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; die "dpkg-buildpackage failed (log above)"; }

deb=muxd_${version}_all.deb
[[ -f $work/$deb ]] || die "dpkg-buildpackage made no $deb"
if [[ $lintian == yes ]]; then
    say "lintian -I --pedantic"
    "${clean_env[@]}" lintian -I --pedantic --fail-on error,warning "$work"/muxd_*.changes \
        || die "lintian reported errors or warnings (above)"
fi
mkdir -p "$outdir"
cp "$work/$deb" "$outdir/$deb"
say "wrote $outdir/$deb"
