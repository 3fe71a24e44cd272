# The worker image for docker-compose.yml (users with Docker). Installed editable from
# the source tree, so the numbered DDL in sql/ and the price book travel with it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meterstream ./meterstream
COPY sql ./sql
COPY services ./services
RUN pip install --no-cache-dir -e .
ENV METERSTREAM_WORKER__WEB_BIND=0.0.0.0
CMD ["meterstream", "worker"]
