# The control-plane image (also runs the Kubernetes agent): streamspace/control-plane, for
# those who can pull the bases. scripts/build_images.sh control-plane builds the same
# image without any registry (images/control-plane/; README "Container images").
FROM node:20-bookworm-slim AS novnc
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 LANG=C.UTF-8 DEBUG=false STREAMSPACE_VAR_DIR=/app/var
WORKDIR /app
COPY images/control-plane/requirements.txt ./images/control-plane/requirements.txt
RUN pip install -r images/control-plane/requirements.txt
COPY . .
COPY --from=novnc /app/node_modules ./node_modules
# The settings make their var dir on import: a throwaway one, so /app/var stays empty.
RUN SECRET_KEY=build-only STREAMSPACE_VAR_DIR=/tmp/build-var python manage.py collectstatic --noinput -v0 \
    && rm -rf /tmp/build-var var
COPY images/control-plane/healthcheck.sh /usr/local/bin/streamspace-healthcheck
# As scripts/build_images.sh: bytecode compiled at build (the app's files are read-only to
# uid 10001) and no pip at run time. No registry is reachable where this project is built
# and tested: this recipe is not built there (the script's image is the tested one).
RUN groupadd -g 10001 streamspace && useradd -u 10001 -g 10001 -M -d /app -s /usr/sbin/nologin streamspace \
    && install -d -o 10001 -g 10001 var \
    && python -m compileall -q /app && python -m pip uninstall -y -q pip
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --retries=3 CMD ["streamspace-healthcheck"]
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--websocket_timeout", "-1", "--websocket_connect_timeout", "30", \
     "streamspace.asgi:application"]
