# The worker image for docker-compose.yml (users with Docker): the wheel built from this repo,
# installed with the server extra. The DDL and saved queries (sql/) and the price data travel
# inside the wheel, so nothing of the source tree is needed at run time.
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/meterstream-*.whl)[server]" && rm -rf /wheels
ENV METERSTREAM_WORKER__WEB_BIND=0.0.0.0
CMD ["meterstream", "worker"]
