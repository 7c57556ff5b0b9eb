# The queue worker (and its devstack, for compose). Small and non-root.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY queue_worker ./queue_worker
RUN pip install . && useradd --system --uid 10001 worker
USER worker

EXPOSE 8084
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8084/health', timeout=2).status == 200 else 1)"
ENTRYPOINT ["queue-worker"]
CMD ["run"]
