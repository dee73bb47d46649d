# streamspace/control-plane: the Django app (Daphne by default; Celery worker and beat,
# manage.py and the Kubernetes agent by command). Built by scripts/build_images.sh;
# the root Dockerfile is the same recipe for those who can pull python:3.11-slim.
IMAGE=streamspace/control-plane
PACKAGES=()
REQUIREMENTS=images/control-plane/requirements.txt
INPUTS=(manage.py streamspace agents_app sessions_app vnc_app agent_clients templates static
    node_modules/@novnc/novnc) # noVNC: the installed npm package (package.json), as `./dev` installs it
CHANGES=(
    'ENV PATH=/opt/streamspace/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    'ENV PYTHONUNBUFFERED=1 LANG=C.UTF-8 DEBUG=false STREAMSPACE_VAR_DIR=/app/var'
    'WORKDIR /app'
    'USER 10001:10001'
    'EXPOSE 8000'
    'HEALTHCHECK --interval=5s --timeout=3s --retries=3 CMD ["streamspace-healthcheck"]'
    'CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--websocket_timeout", "-1", "--websocket_connect_timeout", "30", "streamspace.asgi:application"]'
)

configure() {
    [ -f "$ROOTFS/app/node_modules/@novnc/novnc/core/rfb.js" ] \
        || die "noVNC is not installed (npm ci: ./dev test or ./dev up installs it)"
    # Static files (WhiteNoise serves them): collected at build, as in the Dockerfile. The
    # settings make their var dir (the filesystem broker's folders) on import: a throwaway
    # one here, so /app/var stays empty and the user's (10001) own.
    in_root SECRET_KEY=build-only DEBUG=false STREAMSPACE_VAR_DIR=/tmp/build-var \
        /opt/streamspace/bin/python /app/manage.py collectstatic --noinput -v0
    rm -rf "$ROOTFS/tmp/build-var"
    install -m 0755 "$HERE/images/control-plane/healthcheck.sh" "$ROOTFS/usr/local/bin/streamspace-healthcheck"
    install -d -o "$UID_GID" -g "$UID_GID" "$ROOTFS/app/var" # SQLite/filesystem broker when no DATABASE_URL
}
