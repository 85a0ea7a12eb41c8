# Herald: build the production profile (release with link-time optimisation), run it on a slim
# Debian with curl for health checks.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --profile production --locked --bin herald

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/herald --create-home herald \
    && install -d -o herald -g herald /var/lib/herald/outbox
COPY --from=build /src/target/production/herald /usr/local/bin/herald
USER herald
WORKDIR /var/lib/herald
ENV HERALD_HTTP__BIND=0.0.0.0:8080 \
    HERALD_LOG__FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["herald"]
CMD ["serve"]
