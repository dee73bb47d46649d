#!/bin/sh
# StreamSpace desktop: TigerVNC Xvnc + openbox + an xterm that is always open and focused.
#
# Refuses to start without VNC_PASSWORD: this image never runs an open VNC server.
# Xvnc listens on all interfaces *inside* the container; the host publishes the port on
# 127.0.0.1 only. Settings: VNC_PASSWORD (required), VNC_PORT (5901), VNC_GEOMETRY (1280x800),
# SOUND_PORT (unset: no sound; else the Opus stream's port, see the sound block),
# and the clipboard ones in the block below.
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

# --- sound (templates with sound set SOUND_PORT) -----------------------------------------
# PulseAudio with a null sink as the only (so default) output; every TCP connection to
# SOUND_PORT gets its own encoder: the sink's monitor as 48 kHz stereo PCM (parec, 10 ms
# fragments) -> Opus in 10 ms frames -> Ogg, one page per packet (no muxing delay). Nothing
# is encoded while nobody listens. Desktop programs find the server through PULSE_SERVER
# (`docker exec` needs `-e PULSE_SERVER=unix:/tmp/streamspace-pulse/native`).
if [ -n "${SOUND_PORT:-}" ]; then
    export PULSE_SERVER=unix:/tmp/streamspace-pulse/native
    mkdir -p -m 700 /tmp/streamspace-pulse "$RUN_DIR/xdg"
    XDG_RUNTIME_DIR="$RUN_DIR/xdg" pulseaudio -n --daemonize=no --exit-idle-time=-1 --disallow-exit \
        --disable-shm=yes --log-level=error \
        -L "module-native-protocol-unix socket=/tmp/streamspace-pulse/native" \
        -L "module-null-sink sink_name=streamspace rate=48000 channels=2 sink_properties=device.description=StreamSpace" \
        >/dev/null 2>&1 &
    cat >"$RUN_DIR/sound-stream" <<'STREAM'
#!/bin/sh
parec --device=streamspace.monitor --format=s16le --rate=48000 --channels=2 --latency-msec=10 --raw |
    gst-launch-1.0 -q fdsrc fd=0 blocksize=1920 \
        ! rawaudioparse format=pcm pcm-format=s16le sample-rate=48000 num-channels=2 \
        ! opusenc frame-size=10 bitrate=96000 ! oggmux max-delay=0 max-page-delay=0 ! fdsink fd=1 sync=false
STREAM
    chmod 755 "$RUN_DIR/sound-stream"
    socat TCP-LISTEN:"$SOUND_PORT",reuseaddr,nodelay,fork,max-children=8 EXEC:"$RUN_DIR/sound-stream" >/dev/null 2>&1 &
fi
# --- end of sound --------------------------------------------------------------------------
# --- clipboard (StreamSpace sets these from the template and the operator's limits) ---
# VNC_CLIPBOARD_TO_DESKTOP / VNC_CLIPBOARD_TO_BROWSER: 1 (default) or 0 turns a direction
# off; VNC_CLIPBOARD_MAX_TO_DESKTOP: largest clipboard accepted from a viewer, in bytes.
# AllowOverride leaves out SendCutText and AcceptCutText: vncconfig inside the desktop
# cannot turn a direction back on.
for value in "${VNC_CLIPBOARD_TO_DESKTOP:-1}" "${VNC_CLIPBOARD_TO_BROWSER:-1}" "${VNC_CLIPBOARD_MAX_TO_DESKTOP:-1048576}"; do
    case $value in
        '' | *[!0-9]*) echo "streamspace-desktop: refusing to start: bad VNC_CLIPBOARD_* value '$value'" >&2; exit 64 ;;
    esac
done
CLIPBOARD_ARGS="-AcceptCutText=${VNC_CLIPBOARD_TO_DESKTOP:-1} -SendCutText=${VNC_CLIPBOARD_TO_BROWSER:-1}"
CLIPBOARD_ARGS="$CLIPBOARD_ARGS -MaxCutText=${VNC_CLIPBOARD_MAX_TO_DESKTOP:-1048576}"
CLIPBOARD_ARGS="$CLIPBOARD_ARGS -AllowOverride=desktop,AcceptPointerEvents,SendPrimary,SetPrimary"
# --- end clipboard ---
# --- files: the folders the viewer's Files panel uses (uploads land in ~/Uploads, the
# panel offers what is in ~/Downloads). The agent makes them too when they are missing.
mkdir -p "$HOME/Uploads" "$HOME/Downloads" 2>/dev/null || true
# --- end files

rm -f /tmp/.X1-lock /tmp/.X11-unix/X1 2>/dev/null || true
Xvnc :1 -rfbport "$VNC_PORT" -SecurityTypes VncAuth -PasswordFile "$PASSWD_FILE" \
    -geometry "$VNC_GEOMETRY" -depth 24 -localhost=0 -AlwaysShared -desktop StreamSpace \
    $CLIPBOARD_ARGS &
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
