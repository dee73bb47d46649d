#!/bin/sh
# StreamSpace desktop: TigerVNC Xvnc + openbox + an xterm that is always open and focused.
#
# Refuses to start without VNC_PASSWORD: this image never runs an open VNC server.
# Xvnc listens on all interfaces *inside* the container; the host publishes the port on
# 127.0.0.1 only. Settings: VNC_PASSWORD (required), VNC_PORT (5901), VNC_GEOMETRY (1280x800).
set -eu

if [ -z "${VNC_PASSWORD:-}" ]; then
    echo "streamspace-desktop: refusing to start: VNC_PASSWORD is not set (no open VNC servers)" >&2
    exit 64
fi

export HOME="${HOME:-/home/user}"
export DISPLAY=:1
export USER="$(id -un 2>/dev/null || echo user)"
VNC_PORT="${VNC_PORT:-5901}"
VNC_GEOMETRY="${VNC_GEOMETRY:-1280x800}"

# The password file lives in a private tmpdir, not in the (persistent) home volume.
umask 077
RUN_DIR="$(mktemp -d /tmp/streamspace-vnc.XXXXXX)"
PASSWD_FILE="$RUN_DIR/passwd"
printf '%s\n' "$VNC_PASSWORD" | vncpasswd -f >"$PASSWD_FILE"
unset VNC_PASSWORD
umask 022

if [ ! -w "$HOME" ]; then
    echo "streamspace-desktop: warning: HOME=$HOME is not writable by $(id -u); files will not persist" >&2
fi
cd "$HOME" 2>/dev/null || cd /

# --- files: the folders the viewer's Files panel uses (uploads land in ~/Uploads, the
# panel offers what is in ~/Downloads). The agent makes them too when they are missing.
mkdir -p "$HOME/Uploads" "$HOME/Downloads" 2>/dev/null || true
# --- end files

rm -f /tmp/.X1-lock /tmp/.X11-unix/X1 2>/dev/null || true
Xvnc :1 -rfbport "$VNC_PORT" -SecurityTypes VncAuth -PasswordFile "$PASSWD_FILE" \
    -geometry "$VNC_GEOMETRY" -depth 24 -localhost=0 -AlwaysShared -desktop StreamSpace &
XVNC_PID=$!

trap 'kill -TERM "$XVNC_PID" 2>/dev/null; exit 0' TERM INT

# Wait (bounded) for the X server's socket before starting clients.
i=0
while [ ! -S /tmp/.X11-unix/X1 ]; do
    if ! kill -0 "$XVNC_PID" 2>/dev/null; then
        echo "streamspace-desktop: Xvnc exited during start-up" >&2
        exit 1
    fi
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then
        echo "streamspace-desktop: Xvnc did not open display :1 within 20s" >&2
        exit 1
    fi
    sleep 0.1
done

# Start the window manager and wait (bounded) until it has taken the display: an xterm
# mapped while openbox is still starting could stay unmanaged and invisible (seen after wakes).
openbox --startup "touch $RUN_DIR/wm-ready" >/dev/null 2>&1 &
i=0
while [ ! -e "$RUN_DIR/wm-ready" ] && [ "$i" -lt 100 ]; do
    i=$((i + 1))
    sleep 0.1
done

# The terminal: restarted whenever it exits, for as long as the X server lives.
(
    while kill -0 "$XVNC_PID" 2>/dev/null; do
        xterm -geometry 100x30+40+40 -title Terminal -bg black -fg white -fa Monospace -fs 11 \
            >/dev/null 2>&1 || true
        sleep 0.5
    done
) &

wait "$XVNC_PID"
