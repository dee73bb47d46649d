# streamspace/postgres: Debian bookworm's PostgreSQL 15, run as `postgres`, for the
# Docker Compose deployment (deploy/compose). Same settings as the official image
# (POSTGRES_PASSWORD, POSTGRES_USER, POSTGRES_DB, PGDATA); see entrypoint.sh.
IMAGE=streamspace/postgres
PACKAGES=(postgresql-15)
CHANGES=(
    'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    'ENV PGDATA=/var/lib/postgresql/data'
    'ENV LANG=C.UTF-8'
    'USER postgres'
    'WORKDIR /var/lib/postgresql'
    'EXPOSE 5432'
    'VOLUME /var/lib/postgresql/data'
    'HEALTHCHECK --interval=2s --timeout=5s --retries=30 CMD ["pg_isready", "-q", "-h", "127.0.0.1"]'
    'ENTRYPOINT ["/usr/local/bin/streamspace-postgres"]'
)
prepare() {
    # The user `postgres` is uid/gid 999, as in the official image (before the package makes
    # one of its own): a data volume moves between the two (compose.official-images.yaml).
    in_root groupadd -r -g 999 postgres
    in_root useradd -r -u 999 -g postgres -d /var/lib/postgresql -s /bin/bash postgres
}
configure() {
    # The package made a cluster of its own (/etc/postgresql/15/main); the image makes
    # its cluster at first start, in the data volume.
    rm -rf "$ROOTFS/etc/postgresql/15/main" "$ROOTFS/var/lib/postgresql/15"
    # No JIT (a third of the image: libLLVM and the bitcode; StreamSpace's queries are
    # small): without its provider library PostgreSQL runs every query interpreted.
    rm -rf "$ROOTFS"/usr/lib/postgresql/15/lib/llvmjit* "$ROOTFS"/usr/lib/postgresql/15/lib/bitcode \
        "$ROOTFS"/usr/lib/x86_64-linux-gnu/libLLVM-*
    install -m 0755 "$HERE/images/postgres/entrypoint.sh" "$ROOTFS/usr/local/bin/streamspace-postgres"
    install -d -m 0700 "$ROOTFS/var/lib/postgresql/data"
    install -d -m 2775 "$ROOTFS/var/run/postgresql"
    in_root chown postgres:postgres /var/lib/postgresql /var/lib/postgresql/data /var/run/postgresql
}
