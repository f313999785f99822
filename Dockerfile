# One image for every Strata process; the command picks the process.
FROM python:3.11-slim
WORKDIR /app
# pg_dump / pg_restore for AdminService backups and branches: version 18 from the PostgreSQL apt
# repository (Debian's own client is older than the server; the embedded package's has no TLS).
RUN apt-get update \
 && apt-get install -y --no-install-recommends make ca-certificates curl \
 && install -d /usr/share/postgresql-common/pgdg \
 && curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
      https://www.postgresql.org/media/keys/ACCC4CF8.asc \
 && . /etc/os-release \
 && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt ${VERSION_CODENAME}-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-18 \
 && apt-get purge -y --auto-remove curl \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md Makefile buf.yaml ./
COPY protos ./protos
COPY shared ./shared
COPY services ./services
COPY gateway ./gateway
RUN make gen && useradd --system strata
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 STRATA_HOST=0.0.0.0
USER strata
CMD ["python", "-m", "shared.launcher"]
