# The control-plane image (also runs the Kubernetes agent): streamspace/control-plane.
# Not built in this project's CI (no registry is reachable there to pull the bases).
FROM node:20-bookworm-slim AS novnc
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBUG=false
WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY . .
COPY --from=novnc /app/node_modules ./node_modules
RUN SECRET_KEY=build-only python manage.py collectstatic --noinput -v0
RUN useradd --uid 10001 --no-create-home streamspace && mkdir -p var && chown streamspace var
USER 10001
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "--websocket_timeout", "-1", "--websocket_connect_timeout", "30", \
     "streamspace.asgi:application"]
