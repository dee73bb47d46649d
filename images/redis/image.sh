# streamspace/redis: Debian bookworm's Redis 7.0, run as `redis`, for the Docker Compose
# deployment (deploy/compose): the channel layer and the Celery broker. No persistence
# (nothing in them outlives a restart that matters: sweeps run again, viewers reconnect),
# listening on every address of the container, never published on the host.
IMAGE=streamspace/redis
PACKAGES=(redis-server)
CHANGES=(
    'ENV LANG=C.UTF-8'
    'USER redis'
    'WORKDIR /var/lib/redis'
    'EXPOSE 6379'
    'HEALTHCHECK --interval=2s --timeout=5s --retries=30 CMD ["redis-cli", "ping"]'
    'CMD ["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"]'
)
configure() {
    # Debian's unit file runs it with /etc/redis/redis.conf; the container runs it with
    # the arguments above, in the foreground, logging to stdout.
    in_root chown redis:redis /var/lib/redis
}
