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
RUN SECRET_KEY=build-only python manage.py collectstatic --noinput -v0
COPY images/control-plane/healthcheck.sh /usr/local/bin/streamspace-healthcheck
RUN groupadd -g 10001 streamspace && useradd -u 10001 -g 10001 -M -d /app -s /usr/sbin/nologin streamspace \
    && install -d -o 10001 -g 10001 var
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --retries=3 CMD ["streamspace-healthcheck"]
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--websocket_timeout", "-1", "--websocket_connect_timeout", "30", \
     "streamspace.asgi:application"]
