# One image for every Strata process; the command picks the process.
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md Makefile buf.yaml ./
COPY protos ./protos
COPY shared ./shared
COPY services ./services
COPY gateway ./gateway
RUN make gen && useradd --system strata
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 STRATA_HOST=0.0.0.0
USER strata
CMD ["python", "-m", "shared.launcher"]
