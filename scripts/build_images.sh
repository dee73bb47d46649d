#!/usr/bin/env bash
# Build the platform's container images without any registry, from Debian packages and
# PyPI: one Debian bookworm rootfs (debootstrap minbase + python3), made once and cached
# by its package list, is the base of every image; each image adds its own Debian
# packages, a virtualenv with its pinned Python packages, its files, and is imported with
# `docker import`. One folder per image: images/<name>/image.sh (see images/README.md).
#
# Each image is tagged by a hash of its inputs (this script, the base's package list, its
# folder, its requirements and every file it copies in): <repository>:<12 hex>, also
# tagged :latest. A build whose tag exists is skipped (cached); --force rebuilds.
# Downloaded .debs and wheels are cached under $IMAGE_CACHE.
#
# Usage: scripts/build_images.sh [--force] [name ...]   (no name: every images/*/image.sh)
#        scripts/build_images.sh --tag name              print the image:tag, build nothing
# Env:   DEBIAN_MIRROR, IMAGE_CACHE (default /var/cache/streamspace), BUILD_CA_BUNDLE (the
#        CAs pip trusts while building: the build host's, default
#        /etc/ssl/certs/ca-certificates.crt; not kept in the image)
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${IMAGE_CACHE:-/var/cache/streamspace}
CA_BUNDLE=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUITE=bookworm
# The shared base: every image has python3 (3.11 on bookworm, as the project) and a venv.
BASE_PACKAGES=python3,python3-venv,ca-certificates
UID_GID=10001 # the unprivileged user `streamspace` of every image

START=$(date +%s)
step() { printf '[%4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
die() { step "FAILED: $*" >&2; exit 1; }

FORCE=0
PRINT_TAG=0
NAMES=()
for arg in "$@"; do
    case $arg in
        --force) FORCE=1 ;;
        --tag) PRINT_TAG=1 ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        -*) echo "build_images: unknown argument $arg" >&2; exit 2 ;;
        *) NAMES+=("$arg") ;;
    esac
done
if [ ${#NAMES[@]} = 0 ]; then
    for f in "$HERE"/images/*/image.sh; do NAMES+=("$(basename "$(dirname "$f")")"); done
fi
for name in "${NAMES[@]}"; do
    [ -f "$HERE/images/$name/image.sh" ] || die "no image '$name' (no images/$name/image.sh)"
done

base_hash() { printf '%s\n' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12; }

# The files an image copies in, relative to the checkout, one a line, sorted: what git
# tracks (and untracked files it does not ignore) under each input; an input git ignores
# (node_modules/...: the installed npm package) by its files on disk. No bytecode.
input_files() {
    local p list
    for p in "$@"; do
        [ -e "$HERE/$p" ] || die "input $p does not exist"
        list=""
        if git -C "$HERE" rev-parse --git-dir >/dev/null 2>&1; then
            list=$(git -C "$HERE" ls-files -co --exclude-standard -- "$p")
        fi
        if [ -z "$list" ]; then list=$(cd "$HERE" && find -L "$p" -type f); fi
        printf '%s\n' "$list"
    done | grep -v -e '__pycache__/' -e '\.pyc$' | while IFS= read -r f; do
        [ -f "$HERE/$f" ] && printf '%s\n' "$f"
    done | sort -u
}

# Load images/<name>/image.sh into the current shell: IMAGE, PACKAGES, REQUIREMENTS,
# INPUTS, CHANGES and the configure function.
load() {
    IMAGE="" PACKAGES=() REQUIREMENTS="" INPUTS=() CHANGES=()
    configure() { :; }
    # shellcheck source=/dev/null
    . "$HERE/images/$1/image.sh"
    [ -n "$IMAGE" ] || die "images/$1/image.sh sets no IMAGE"
}

image_tag() {
    local name=$1 hash
    hash=$(
        cd "$HERE"
        {
            sha256sum scripts/build_images.sh
            echo "base $(base_hash)"
            find "images/$name" -type f | sort | xargs -d '\n' sha256sum
            printf 'packages %s\n' "${PACKAGES[*]}"
            [ -z "$REQUIREMENTS" ] || sha256sum "$REQUIREMENTS"
            [ ${#INPUTS[@]} = 0 ] || input_files "${INPUTS[@]}" | xargs -d '\n' sha256sum
        } | sha256sum | cut -c1-12
    )
    echo "$IMAGE:$hash"
}

if [ "$PRINT_TAG" = 1 ]; then
    for name in "${NAMES[@]}"; do load "$name"; image_tag "$name"; done
    exit 0
fi

[ "$(id -u)" = 0 ] || die "building images needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (run scripts/ensure_dockerd.sh)"
mkdir -p "$CACHE/debootstrap" "$CACHE/images" "$CACHE/apt-archives/partial" "$CACHE/pip"

WORK=$(mktemp -d /var/tmp/streamspace-images.XXXXXX)
MOUNTS=()
unmount_all() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" || true; done
    MOUNTS=()
}
cleanup() { unmount_all; rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT

# Run a long command with its output in a log ($WORK/<label>.log); the terminal gets a
# running count every 50 output lines that match $2 (a regex), and the log's tail if it fails.
logged() {
    local label=$1 pattern=$2 log=$WORK/$1.log rc=0
    shift 2
    "$@" 2>&1 | tee "$log" | count_lines "$label" "$pattern" "${EVERY:-50}" || rc=$?
    if [ "$rc" != 0 ]; then tail -n 25 "$log" >&2; die "$label failed (exit $rc)"; fi
}
count_lines() {
    local n=0 line
    while IFS= read -r line; do
        if [[ $line =~ $2 ]]; then
            n=$((n + 1))
            if [ $((n % ${3:-50})) = 0 ]; then step "    ... $1: $n"; fi
        fi
    done
    step "    $1: $n in all"
}

# The shared base rootfs, as a tar in the cache (made once; concurrent builds wait).
ensure_base() {
    BASE_TAR=$CACHE/images/base-$SUITE-$(base_hash).tar
    exec 9>"$CACHE/images/base.lock"
    flock 9
    if [ ! -f "$BASE_TAR" ]; then
        local rootfs=$WORK/base
        mkdir -p "$rootfs"
        step "base: debootstrap $SUITE minbase + $BASE_PACKAGES from $MIRROR (once; cached in $BASE_TAR)"
        logged debootstrap '^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) ' \
            debootstrap --variant=minbase --include="$BASE_PACKAGES" --cache-dir="$CACHE/debootstrap" \
            "$SUITE" "$rootfs" "$MIRROR"
        # Services never start inside a build (postinst scripts of server packages).
        printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" && chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
        tar --numeric-owner --xattrs --xattrs-include='security.capability' -C "$rootfs" -cf "$BASE_TAR.tmp" .
        mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf --one-file-system "$rootfs"
        step "base: $(du -h "$BASE_TAR" | cut -f1)"
    fi
    flock -u 9
}

# Builds of older inputs: keep the newest $KEEP tags of a repository (other checkouts may
# use them), remove the rest unless a container uses them.
KEEP=3
prune() {
    local old
    docker image ls "$1" --format '{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}' | grep -v ':latest$' | sort -r \
        | tail -n +$((KEEP + 1)) | cut -f2 | while IFS= read -r old; do
        if docker image rm "$old" >/dev/null 2>&1; then step "    removed the older build $old"; fi
    done
}

in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

bind() { mkdir -p "$2" && mount --bind "$1" "$2" && MOUNTS+=("$2"); }

build_one() {
    local name=$1 ref=$2 t0
    t0=$(date +%s)
    ROOTFS=$WORK/$name
    mkdir -p "$ROOTFS"
    step "$name: unpack the base"
    tar --numeric-owner --xattrs --xattrs-include='security.capability' -C "$ROOTFS" -xf "$BASE_TAR"
    mount -t proc proc "$ROOTFS/proc" && MOUNTS+=("$ROOTFS/proc")
    bind "$CACHE/apt-archives" "$ROOTFS/var/cache/apt/archives"
    bind "$CACHE/pip" "$ROOTFS/root/.cache/pip"
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"

    if [ ${#PACKAGES[@]} != 0 ]; then
        step "$name: apt-get install ${PACKAGES[*]}"
        exec 8>"$CACHE/apt-archives.lock" # builds running at once share the .deb cache: one apt at a time
        flock 8
        # The base's package lists may be older than the mirror (a point release drops old .debs).
        logged apt-update '^(Get|Hit):' in_root apt-get update
        logged apt '^(Get:|Unpacking|Setting up) ' in_root apt-get install -y --no-install-recommends "${PACKAGES[@]}"
        flock -u 8
    fi
    if [ -n "$REQUIREMENTS" ]; then
        step "$name: virtualenv /opt/streamspace + pip install -r $REQUIREMENTS (PyPI)"
        cp "$HERE/$REQUIREMENTS" "$ROOTFS/tmp/requirements.txt"
        cp "$CA_BUNDLE" "$ROOTFS/tmp/build-ca.crt"
        in_root python3 -m venv /opt/streamspace
        EVERY=10 logged pip '^Collecting ' in_root /opt/streamspace/bin/pip install \
            --disable-pip-version-check --no-warn-script-location --progress-bar off \
            --cert /tmp/build-ca.crt -r /tmp/requirements.txt
        rm -f "$ROOTFS/tmp/requirements.txt" "$ROOTFS/tmp/build-ca.crt"
        in_root /opt/streamspace/bin/python -m pip uninstall -y -q pip # nothing installs at run time
    fi

    in_root groupadd -g "$UID_GID" streamspace
    in_root useradd -u "$UID_GID" -g "$UID_GID" -M -d /app -s /usr/sbin/nologin streamspace
    if [ ${#INPUTS[@]} != 0 ]; then
        step "$name: copy $(input_files "${INPUTS[@]}" | wc -l) files into /app"
        mkdir -p "$ROOTFS/app"
        input_files "${INPUTS[@]}" | tar -C "$HERE" --dereference --no-recursion -cf - -T - | tar -C "$ROOTFS/app" -xf - --no-same-owner
        in_root /opt/streamspace/bin/python -m compileall -q /app >/dev/null 2>&1 || in_root python3 -m compileall -q /app >/dev/null
    fi
    step "$name: configure (images/$name/image.sh)"
    configure

    step "$name: slim: drop apt lists, caches, docs, man pages, locales"
    unmount_all
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/cache/debconf/*-old \
        "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
        "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/* "$ROOTFS"/root/.cache "$ROOTFS/usr/sbin/policy-rc.d"
    find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    : >"$ROOTFS/etc/resolv.conf"
    echo "$name" >"$ROOTFS/etc/hostname"

    step "$name: docker import as $ref"
    local changes=()
    for c in "${CHANGES[@]}"; do changes+=(--change "$c"); done
    tar --numeric-owner --xattrs --xattrs-include='security.capability' -C "$ROOTFS" -c . | docker import \
        "${changes[@]}" --change "LABEL org.opencontainers.image.title=$IMAGE" \
        --message "streamspace $name (debootstrap $SUITE minbase)" - "$ref" >/dev/null
    docker tag "$ref" "$IMAGE:latest"
    rm -rf --one-file-system "$ROOTFS"
    prune "$IMAGE"
    SECONDS_OF[$name]=$(($(date +%s) - t0))
}

declare -A SECONDS_OF REF_OF
for name in "${NAMES[@]}"; do
    load "$name"
    ref=$(image_tag "$name")
    REF_OF[$name]=$ref
    if [ "$FORCE" = 0 ] && docker image inspect "$ref" >/dev/null 2>&1; then
        docker tag "$ref" "$IMAGE:latest"
        step "$name: $ref already exists (cached; --force rebuilds)"
        SECONDS_OF[$name]=cached
        continue
    fi
    ensure_base
    build_one "$name" "$ref"
done

step "images:"
for name in "${NAMES[@]}"; do
    size=$(docker image inspect -f '{{.Size}}' "${REF_OF[$name]}")
    time=${SECONDS_OF[$name]}
    [ "$time" = cached ] || time="built in ${time}s"
    printf '    %-50s %5s MB  %s\n' "${REF_OF[$name]}" "$((size / 1000000))" "$time"
done
