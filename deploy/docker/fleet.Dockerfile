# Fleet server image:
#   docker build -f deploy/docker/fleet.Dockerfile -t edgefleet-fleet .
# Not built in this repository's CI: the CI machine has no Docker engine (see deploy/README.md).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgefleet edgefleet
COPY protocol protocol
COPY agent agent
COPY toolchain toolchain
COPY fleet_server fleet_server
COPY firmware_profiles firmware_profiles
# 'postgres': psycopg for [registry] url = "postgresql://…" (deploy/cluster runs two servers on one)
RUN python -m venv /opt/edgefleet && /opt/edgefleet/bin/pip install --no-cache-dir '.[fleet,postgres]'

FROM python:3.11-slim-bookworm
# a fixed uid, so files mounted into the container (deploy/cluster/secrets) can be owned by it
RUN useradd --system --uid 10001 --home /var/lib/edgefleet --create-home edgefleet
COPY --from=build /opt/edgefleet /opt/edgefleet
USER edgefleet
WORKDIR /var/lib/edgefleet
EXPOSE 8080
ENTRYPOINT ["/opt/edgefleet/bin/edgefleet", "fleet", "serve"]
CMD ["--config", "/etc/edgefleet/fleet.toml"]
