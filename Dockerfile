# The worker image for docker-compose.yml (users with Docker): the wheel built from this repo,
# installed with the server extra. The DDL and saved queries (sql/), the price data and the service
# files (services/) travel inside the wheel (meterstream/sql and meterstream/services/files are links
# that COPY keeps and the wheel build follows), so nothing of the source tree is needed at run time;
# tests/system/test_packaging.py runs the same wheel in a clean virtualenv.
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/meterstream-*.whl)[server]" && rm -rf /wheels
ENV METERSTREAM_WORKER__WEB_BIND=0.0.0.0
CMD ["meterstream", "worker"]
