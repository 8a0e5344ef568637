# drtool: the backup-cron / one-shot backup / drill image for co-talk.
#
#   docker build -t drtool:latest .
#
# Build-time network: the PostgreSQL 16 client comes from the PGDG apt repository
# (apt.postgresql.org), Debian bookworm's own is 15 and pg_dump must be at least the server's
# major version. Set PG_APT_REPO="" to skip PGDG and use the distribution's client instead
# (e.g. when building from a local base image without network; the server must then be <= 15).
# Set PIP_WHEELHOUSE=DIR (a directory of wheels inside the build context) to install drtool's
# Python dependencies from it only, without an index (the default: PyPI). .ci/docker-images
# builds drtool:ci that way, FROM a locally built Python base.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG PG_MAJOR=16
ARG PG_APT_REPO=http://apt.postgresql.org/pub/repos/apt
ARG PG_APT_KEY=https://www.postgresql.org/media/keys/ACCC4CF8.asc

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DRTOOL_HOME=/var/lib/drtool \
    DRTOOL_SCHEDULE_DIR=/etc/drtool/schedules \
    DRTOOL_METRICS_ADDRESS=0.0.0.0 \
    DRTOOL_METRICS_PORT=9465

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl gnupg redis-tools zstd age; \
    if [ -n "$PG_APT_REPO" ]; then \
        install -d /usr/share/postgresql-common/pgdg; \
        curl -fsSL "$PG_APT_KEY" | gpg --dearmor -o /usr/share/postgresql-common/pgdg/apt.gpg; \
        echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.gpg] $PG_APT_REPO bookworm-pgdg main" \
            > /etc/apt/sources.list.d/pgdg.list; \
        apt-get update; \
        apt-get install -y --no-install-recommends "postgresql-client-$PG_MAJOR"; \
    else \
        apt-get install -y --no-install-recommends postgresql-client; \
    fi; \
    apt-get purge -y --auto-remove curl gnupg; \
    rm -rf /var/lib/apt/lists/*; \
    pg_dump --version; redis-cli --version; zstd --version; age --version

# restore_drills/reports exists in the image, owned by drtool: the `drill` service bind-mounts
# weekly.toml into restore_drills/ of its state volume, and a directory Docker creates for a
# mount point is root's, so the drill (uid 10001) could not create its reports there. A new
# volume is filled from the image, ownership included.
RUN groupadd --system --gid 10001 drtool \
    && useradd --system --uid 10001 --gid drtool --home-dir /var/lib/drtool --create-home drtool \
    && install -d -o drtool -g drtool -m 0700 /var/lib/drtool/state \
    && install -d -o drtool -g drtool -m 0750 /var/lib/drtool/restore_drills \
        /var/lib/drtool/restore_drills/reports \
    && install -d -m 0755 /etc/drtool/schedules

ARG PIP_WHEELHOUSE=
COPY . /src
RUN if [ -n "$PIP_WHEELHOUSE" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="/src/$PIP_WHEELHOUSE"; fi; \
    pip install /src && rm -rf /src

USER drtool
WORKDIR /var/lib/drtool
VOLUME ["/var/lib/drtool"]
EXPOSE 9465

# backup-cron overrides nothing here; the one-shot `backup` service has no schedule files
# and disables the check in docker-compose.backup.yml.
HEALTHCHECK --interval=5m --timeout=30s --start-period=2h --retries=1 \
    CMD ["drtool", "schedule", "health"]

ENTRYPOINT ["drtool"]
CMD ["schedule", "run"]
