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
# Downloaded .debs are cached under $IMAGE_CACHE, and so are the wheels (wheels/<hash of
# the requirements file>: pip download once, then pip install --no-index from there; pip's
# own HTTP cache stays empty here: the PyPI proxy sends no caching headers) and each
# image's dependencies (deps/<hash>.tar: its rootfs after apt and the virtualenv, keyed by
# the base, its packages and its requirements), so a change of code only copies files.
# Builds of this checkout older than the newest $KEEP are removed (other checkouts' never).
#
# Usage: scripts/build_images.sh [--force] [name ...]   (no name: every images/*/image.sh)
#        scripts/build_images.sh --tag name              print the image:tag, build nothing
# Env:   DEBIAN_MIRROR, IMAGE_CACHE (default /var/cache/streamspace), BUILD_CA_BUNDLE (the
#        CAs pip trusts while building: the build host's, default
#        /etc/ssl/certs/ca-certificates.crt; not kept in the image), IMAGE_LOCK_TIMEOUT
#        (seconds a build waits for a lock another build holds, default 1800)
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) fails the script
export LC_ALL=C          # sort (the hashes) the same everywhere

HERE=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${IMAGE_CACHE:-/var/cache/streamspace}
CA_BUNDLE=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
SUITE=bookworm
# The shared base: every image has python3 (3.11 on bookworm, as the project) and a venv.
BASE_PACKAGES=python3,python3-venv,ca-certificates
UID_GID=10001 # the unprivileged user `streamspace` of every image
LOCK_WAIT=${IMAGE_LOCK_TIMEOUT:-1800}
CHECKOUT_LABEL=org.streamspace.checkout # on every image: the checkout that built it

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
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
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

# The base's key: its suite, packages and recipe (make_base's text).
base_hash() { { printf '%s\n' "$SUITE" "$BASE_PACKAGES"; declare -f make_base; } | sha256sum | cut -c1-12; }

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
    done | { grep -v -e '__pycache__/' -e '\.pyc$' || true; } | while IFS= read -r f; do
        if [ -f "$HERE/$f" ]; then printf '%s\n' "$f"; fi
    done | sort -u
}

# Load images/<name>/image.sh into the current shell: IMAGE, PACKAGES, REQUIREMENTS,
# INPUTS, CHANGES and the prepare and configure functions.
load() {
    IMAGE="" PACKAGES=() REQUIREMENTS="" INPUTS=() CHANGES=()
    prepare() { :; }
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

MOUNTS=()
unmount_all() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" || true; done
    MOUNTS=()
}
# The mount points under a directory, deepest first.
mounts_under() { awk -v d="$1/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r; }
# A work directory goes only once nothing is mounted in it: rm would go through a bind
# (same file system) into the shared caches.
remove_work() {
    if [ -n "$(mounts_under "$1")" ]; then
        echo "build_images: $1 still has mounts; left in place" >&2
        return 0
    fi
    rm -rf --one-file-system "$1"
}
cleanup() { unmount_all; remove_work "$WORK"; }

# Work directories of builds that died without their EXIT trap (SIGKILL, a power cut):
# their owner's pid is gone. Unmount what they left mounted, then remove them.
sweep_stale_work() {
    local d pid m
    for d in /var/tmp/streamspace-images.*; do
        [ -d "$d" ] || continue
        pid=$(cat "$d/owner.pid" 2>/dev/null || true)
        if [ -n "$pid" ]; then
            if kill -0 "$pid" 2>/dev/null; then continue; fi
        elif [ -z "$(find "$d" -maxdepth 0 -mmin +180)" ]; then
            continue # no owner recorded (an older script's): only when 3 h old
        fi
        step "sweep: $d (its build, pid ${pid:-?}, is gone)"
        for m in $(mounts_under "$d"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
        remove_work "$d"
    done
}

# flock on fd $1 within LOCK_WAIT seconds, or fail saying which lock.
lock() {
    flock -n "$1" && return 0
    step "    waiting for the lock $2 (another build holds it; at most ${LOCK_WAIT}s)"
    flock -w "$LOCK_WAIT" "$1" || die "waited ${LOCK_WAIT}s for the lock $2"
}

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

TAR=(tar --numeric-owner --xattrs --xattrs-include='security.capability')

# The base rootfs in $1 (its text is part of the base's key).
make_base() {
    logged debootstrap '^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) ' \
        debootstrap --variant=minbase --include="$BASE_PACKAGES" --cache-dir="$CACHE/debootstrap" \
        "$SUITE" "$1" "$MIRROR"
    # Services never start inside a build (postinst scripts of server packages).
    printf '#!/bin/sh\nexit 101\n' >"$1/usr/sbin/policy-rc.d" && chmod 0755 "$1/usr/sbin/policy-rc.d"
}

# The shared base rootfs, as a tar in the cache (made once; concurrent builds wait).
ensure_base() {
    BASE_TAR=$CACHE/images/base-$SUITE-$(base_hash).tar
    exec 9>"$CACHE/images/base.lock"
    lock 9 base.lock
    if [ ! -f "$BASE_TAR" ]; then
        local rootfs=$WORK/base
        mkdir -p "$rootfs"
        step "base: debootstrap $SUITE minbase + $BASE_PACKAGES from $MIRROR (once; cached in $BASE_TAR)"
        make_base "$rootfs"
        "${TAR[@]}" -C "$rootfs" -cf "$BASE_TAR.tmp" .
        mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf --one-file-system "$rootfs"
        step "base: $(du -h "$BASE_TAR" | cut -f1)"
    fi
    flock -u 9
}

# Builds of older inputs: of this checkout's builds of a repository (the label), keep the
# newest $KEEP tags and remove the rest unless a container uses them; other checkouts'
# builds are theirs. Then the untagged images of the repository (a tag moved off them).
KEEP=3
prune() {
    local old
    docker image ls "$1" --filter "label=$CHECKOUT_LABEL=$HERE" --format '{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}' \
        | { grep -v ':latest$' || true; } | sort -r | tail -n +$((KEEP + 1)) | cut -f2 | while IFS= read -r old; do
        if docker image rm "$old" >/dev/null 2>&1; then step "    removed the older build $old"; fi
    done
    docker image ls --filter dangling=true --filter "label=org.opencontainers.image.title=$1" -q | sort -u \
        | while IFS= read -r old; do
            if docker image rm "$old" >/dev/null 2>&1; then step "    removed the untagged build $old"; fi
        done
}

in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

bind() { mkdir -p "$2" && mount --bind "$1" "$2" && MOUNTS+=("$2"); }

# The key of an image's dependencies: the base, prepare(), its packages, its requirements
# and the recipe (install_deps' text).
deps_hash() {
    {
        echo "base $(base_hash)"
        declare -f prepare install_deps
        printf 'packages %s\n' "${PACKAGES[*]}"
        if [ -n "$REQUIREMENTS" ]; then sha256sum <"$HERE/$REQUIREMENTS"; fi
    } | sha256sum | cut -c1-12
}

# Into $ROOTFS (the base, unpacked, /proc mounted): prepare(), the Debian packages, and the
# virtualenv from the cached wheels (downloaded once per requirements file).
install_deps() {
    local name=$1 wheels
    bind "$CACHE/apt-archives" "$ROOTFS/var/cache/apt/archives"
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    prepare
    if [ ${#PACKAGES[@]} != 0 ]; then
        step "$name: apt-get install ${PACKAGES[*]}"
        exec 8>"$CACHE/apt-archives.lock" # builds running at once share the .deb cache: one apt at a time
        lock 8 apt-archives.lock
        # The base's package lists may be older than the mirror (a point release drops old .debs).
        logged apt-update '^(Get|Hit):' in_root apt-get update
        logged apt '^(Get:|Unpacking|Setting up) ' in_root apt-get install -y --no-install-recommends "${PACKAGES[@]}"
        flock -u 8
    fi
    if [ -n "$REQUIREMENTS" ]; then
        wheels=$CACHE/wheels/$(sha256sum <"$HERE/$REQUIREMENTS" | cut -c1-12)
        mkdir -p "$wheels"
        cp "$HERE/$REQUIREMENTS" "$ROOTFS/tmp/requirements.txt"
        in_root python3 -m venv /opt/streamspace
        bind "$wheels" "$ROOTFS/tmp/wheels"
        exec 6>"$wheels.lock"
        lock 6 "$(basename "$wheels").lock"
        if [ ! -f "$wheels/complete" ]; then
            step "$name: pip download -r $REQUIREMENTS into $wheels (once per requirements file)"
            cp "$CA_BUNDLE" "$ROOTFS/tmp/build-ca.crt"
            EVERY=10 logged pip-download '^Collecting ' in_root /opt/streamspace/bin/pip download \
                --disable-pip-version-check --progress-bar off --cert /tmp/build-ca.crt \
                --only-binary :all: -d /tmp/wheels -r /tmp/requirements.txt
            rm -f "$ROOTFS/tmp/build-ca.crt"
            touch "$wheels/complete"
        fi
        flock -u 6
        step "$name: virtualenv /opt/streamspace + pip install -r $REQUIREMENTS ($(find "$wheels" -name '*.whl' | wc -l) cached wheels)"
        EVERY=10 logged pip '^Processing ' in_root /opt/streamspace/bin/pip install \
            --disable-pip-version-check --no-warn-script-location --progress-bar off \
            --no-index --find-links /tmp/wheels -r /tmp/requirements.txt
        rm -f "$ROOTFS/tmp/requirements.txt"
        in_root /opt/streamspace/bin/python -m pip uninstall -y -q pip # nothing installs at run time
    fi
    unmount_all
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS/tmp/wheels"
    : >"$ROOTFS/etc/resolv.conf"
}

build_one() {
    local name=$1 ref=$2 t0 deps
    t0=$(date +%s)
    ROOTFS=$WORK/$name
    mkdir -p "$ROOTFS"
    deps=$CACHE/deps/$name-$(deps_hash).tar
    exec 5>"$deps.lock"
    lock 5 "$(basename "$deps").lock"
    if [ -f "$deps" ]; then
        step "$name: unpack its dependencies (cached: $deps)"
        "${TAR[@]}" -C "$ROOTFS" -xf "$deps"
        flock -u 5
    else
        step "$name: unpack the base"
        "${TAR[@]}" -C "$ROOTFS" -xf "$BASE_TAR"
        mount -t proc proc "$ROOTFS/proc" && MOUNTS+=("$ROOTFS/proc")
        install_deps "$name"
        step "$name: keep its dependencies in $deps"
        "${TAR[@]}" -C "$ROOTFS" -cf "$deps.tmp" .
        mv "$deps.tmp" "$deps"
        flock -u 5
        # Older dependency tars of this image (other keys): the newest $KEEP stay.
        find "$CACHE/deps" -maxdepth 1 -name "$name-*.tar" -printf '%T@ %p\n' | sort -rn | tail -n +$((KEEP + 1)) \
            | cut -d' ' -f2- | xargs -r rm -f
    fi
    mount -t proc proc "$ROOTFS/proc" && MOUNTS+=("$ROOTFS/proc")
    cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"

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
    [ -z "$(mounts_under "$ROOTFS")" ] || die "$ROOTFS still has mounts"
    find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    : >"$ROOTFS/etc/resolv.conf"
    echo "$name" >"$ROOTFS/etc/hostname"

    step "$name: docker import as $ref"
    local changes=()
    for c in "${CHANGES[@]}"; do changes+=(--change "$c"); done
    "${TAR[@]}" -C "$ROOTFS" -c . | docker import \
        "${changes[@]}" --change "LABEL org.opencontainers.image.title=$IMAGE" --change "LABEL $CHECKOUT_LABEL=$HERE" \
        --message "streamspace $name (debootstrap $SUITE minbase)" - "$ref" >/dev/null
    docker tag "$ref" "$IMAGE:latest"
    remove_work "$ROOTFS"
    prune "$IMAGE"
    SECONDS_OF[$name]=$(($(date +%s) - t0))
}

if [ "$PRINT_TAG" = 1 ]; then
    for name in "${NAMES[@]}"; do load "$name"; image_tag "$name"; done
    exit 0
fi

[ "$(id -u)" = 0 ] || die "building images needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (run scripts/ensure_dockerd.sh)"
mkdir -p "$CACHE/debootstrap" "$CACHE/images" "$CACHE/apt-archives/partial" "$CACHE/wheels" "$CACHE/deps"

sweep_stale_work
WORK=$(mktemp -d /var/tmp/streamspace-images.XXXXXX)
echo $$ >"$WORK/owner.pid"
trap cleanup EXIT
trap 'exit 143' TERM # a signal runs the EXIT trap too (unmount, remove the work directory)
trap 'exit 130' INT
trap 'exit 129' HUP

cached() { # the image exists: tag it :latest, say so
    docker tag "$1" "$IMAGE:latest"
    step "$name: $1 already exists (cached; --force rebuilds)"
    SECONDS_OF[$name]=cached
}
declare -A SECONDS_OF REF_OF
for name in "${NAMES[@]}"; do
    load "$name"
    ref=$(image_tag "$name")
    REF_OF[$name]=$ref
    if [ "$FORCE" = 0 ] && docker image inspect "$ref" >/dev/null 2>&1; then cached "$ref"; continue; fi
    # One build of an image at a time: a second build of the same tag waits, then finds it.
    exec 4>"$CACHE/images/$name.lock"
    lock 4 "$name.lock"
    if [ "$FORCE" = 0 ] && docker image inspect "$ref" >/dev/null 2>&1; then
        cached "$ref"
    else
        ensure_base
        build_one "$name" "$ref"
    fi
    flock -u 4
done

step "images:"
for name in "${NAMES[@]}"; do
    size=$(docker image inspect -f '{{.Size}}' "${REF_OF[$name]}")
    time=${SECONDS_OF[$name]}
    [ "$time" = cached ] || time="built in ${time}s"
    printf '    %-50s %5s MB  %s\n' "${REF_OF[$name]}" "$((size / 1000000))" "$time"
done
