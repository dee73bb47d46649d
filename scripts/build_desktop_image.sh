#!/usr/bin/env bash
# Build the demo desktop image without any registry: a Debian bookworm rootfs made with
# debootstrap (minbase) + TigerVNC Xvnc + openbox + xterm, imported with `docker import`.
#
# Built once and cached by tag: exits 0 at once when the tag exists; --force rebuilds.
# Downloaded .debs are cached in $DEBOOTSTRAP_CACHE so a rebuild does not fetch them again.
#
# Usage: scripts/build_desktop_image.sh [--force]
# Env:   DESKTOP_IMAGE (tag), DEBIAN_MIRROR, DEBOOTSTRAP_CACHE
set -euo pipefail

TAG=${DESKTOP_IMAGE:-streamspace/desktop:bookworm-3}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${DEBOOTSTRAP_CACHE:-/var/cache/streamspace/debootstrap}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PACKAGES=tigervnc-standalone-server,tigervnc-tools,openbox,xterm,xfonts-base,fonts-dejavu-core,procps

FORCE=0
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build_desktop_image: unknown argument $arg" >&2; exit 2 ;;
    esac
done

START=$(date +%s)
step() { printf '[%4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { step "FAILED: $*" >&2; exit 1; }

if [ "$FORCE" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    step "$TAG already exists (cached; --force rebuilds)"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (run scripts/ensure_dockerd.sh)"

WORK=$(mktemp -d /var/tmp/streamspace-desktop.XXXXXX)
ROOTFS=$WORK/rootfs
cleanup() { rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT
mkdir -p "$CACHE" "$ROOTFS"

step "1/4 debootstrap bookworm (minbase + $PACKAGES) from $MIRROR (log $WORK/debootstrap.log)"
# Per-package lines go to the log; the rest, with a running package count, to the terminal.
n=0
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE" \
    bookworm "$ROOTFS" "$MIRROR" 2>&1 | tee "$WORK/debootstrap.log" | while IFS= read -r line; do
    case $line in
        "I: Retrieving "* | "I: Validating "* | "I: Extracting "* | "I: Unpacking "* | "I: Configuring "*)
            n=$((n + 1))
            if [ $((n % 100)) = 0 ]; then step "    ... $n package steps"; fi ;;
        *) step "    $line" ;;
    esac
done
[ "${PIPESTATUS[0]}" = 0 ] || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

step "2/4 configure: user 'user' (uid 1000), entrypoint"
chroot "$ROOTFS" groupadd -g 1000 user
chroot "$ROOTFS" useradd -u 1000 -g 1000 -m -d /home/user -s /bin/bash user
install -m 0755 "$HERE/images/desktop/entrypoint.sh" "$ROOTFS/usr/local/bin/streamspace-desktop"
echo streamspace-desktop >"$ROOTFS/etc/hostname"
mkdir -p "$ROOTFS/tmp/.X11-unix" && chmod 1777 "$ROOTFS/tmp/.X11-unix"

step "3/4 slim: drop apt lists, caches, docs, man pages, locales"
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/cache/debconf/*-old \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
    "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/*
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
step "    rootfs: $(du -sh --one-file-system "$ROOTFS" | cut -f1)"

step "4/4 docker import as $TAG"
previous=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENTRYPOINT ["/usr/local/bin/streamspace-desktop"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV HOME=/home/user' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'USER 1000:1000' \
    --change 'WORKDIR /home/user' \
    --change 'EXPOSE 5901' \
    --change 'LABEL org.opencontainers.image.title=streamspace-desktop' \
    --message "streamspace desktop (debootstrap bookworm minbase)" \
    - "$TAG" >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$TAG")
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$TAG")" ]; then
    # The superseded build (now untagged); kept if a container still uses it.
    docker image rm "$previous" >/dev/null 2>&1 || step "    (previous image $previous is still in use: kept)"
fi
step "built $TAG: $((size / 1000000)) MB in $(($(date +%s) - START))s"
