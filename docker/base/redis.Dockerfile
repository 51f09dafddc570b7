# A stand-in for the official Redis image made from Debian's redis-server (7.0 in
# bookworm), for hosts that cannot pull from a container registry.
# docker/base-images.sh builds it; the compose files take it through LIKENESS_REDIS_IMAGE.
ARG DEBIAN_IMAGE=likeness-local/debian:bookworm
FROM ${DEBIAN_IMAGE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && mkdir -p /data \
    && chown redis:redis /data

WORKDIR /data
USER redis
EXPOSE 6379
# As the official image does: without a config file Redis starts in protected mode
# and refuses the other containers, which reach it over the compose network.
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$1\" = redis-server ]; then set -- \"$@\" --protected-mode no; fi; exec \"$@\"", "redis-entrypoint"]
CMD ["redis-server"]
