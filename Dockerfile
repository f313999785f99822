# One image for every Strata process; the command picks the process.
#
# Two stages. `build` installs uv (pinned by hash), generates the stubs with the locked
# codegen group, and installs the locked runtime set into /opt/strata. The final stage
# gets that virtualenv, the code and the PostgreSQL client tools, and nothing else: no
# uv, no protoc, no compiler, no test tool, no embedded Postgres or Redis.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 UV_NO_CACHE=1
COPY requirements/uv.txt requirements/uv.txt
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
      --no-deps --require-hashes --target /opt/uv -r requirements/uv.txt
COPY pyproject.toml uv.lock README.md ./
# /opt/strata: the runtime set, no extra and no dependency group, exactly the locked versions.
# /opt/codegen: protoc, in a virtualenv that never leaves this stage.
RUN UV_PROJECT_ENVIRONMENT=/opt/strata /opt/uv/bin/uv sync --frozen --no-install-project --no-default-groups \
 && UV_PROJECT_ENVIRONMENT=/opt/codegen /opt/uv/bin/uv sync --frozen --no-install-project --no-default-groups --group codegen
COPY protos ./protos
RUN protos/generate.sh /opt/codegen/bin/python

FROM ${PYTHON_IMAGE}
# pg_dump / pg_restore for AdminService backups and branches: version 18 from the PostgreSQL apt
# repository (Debian's own client is older than the server; the embedded package's has no TLS).
# Not pinned (DL3008): the PostgreSQL repository keeps only the newest build of each major.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && install -d /usr/share/postgresql-common/pgdg \
 && curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
      https://www.postgresql.org/media/keys/ACCC4CF8.asc \
 && . /etc/os-release \
 && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt ${VERSION_CODENAME}-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-18 \
 && apt-get purge -y --auto-remove curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin strata
WORKDIR /app
COPY --from=build /opt/strata /opt/strata
COPY --from=build /src/protos ./protos
COPY shared ./shared
COPY services ./services
COPY gateway ./gateway
COPY roles ./roles
# devstack/ (the launcher and the embedded servers) is for development only and not copied.
# The code runs from /app (migrations and strata.protoset are read beside it); the
# generated stubs import as `strata.*` from /app/protos.
ENV PATH=/opt/strata/bin:$PATH PYTHONPATH=/app:/app/protos PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 STRATA_HOST=0.0.0.0
USER 10001
# Every role in one process (STRATA_ROLES, default all); docker-compose.yml runs one role a container.
CMD ["python", "-m", "roles"]
