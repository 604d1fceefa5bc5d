# cfaudit: multi-stage build to a slim, non-root runtime image. Configuration comes only from
# the environment (or a TOML file given with CFAUDIT_CONFIG); see README "Configuration".

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY actors ./actors
COPY src ./src
COPY migrations ./migrations
COPY tests/cfaudit-emulator ./tests/cfaudit-emulator
RUN cargo build --release --locked -p cfaudit -p cfaudit-emulator \
 && strip target/release/cfaudit target/release/cfaudit-emulator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/cfaudit --create-home cfaudit
COPY --from=build /src/target/release/cfaudit /usr/local/bin/cfaudit
# The API emulator, for docker-compose's demo profile only (`entrypoint: cfaudit-emulator`).
COPY --from=build /src/target/release/cfaudit-emulator /usr/local/bin/cfaudit-emulator
USER cfaudit
WORKDIR /var/lib/cfaudit
ENV METRICS_ADDR=0.0.0.0:9464 \
    PARQUET_URL=file:///var/lib/cfaudit/parquet \
    LOG_FORMAT=json
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["cfaudit", "healthcheck"]
ENTRYPOINT ["cfaudit"]
CMD ["run"]
