# On-device agent image, multi-arch (linux/amd64, linux/arm64):
#   docker buildx build --platform linux/amd64,linux/arm64 -f deploy/docker/agent.Dockerfile -t edgefleet-agent .
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
RUN python -m venv /opt/edgefleet && /opt/edgefleet/bin/pip install --no-cache-dir '.[agent,agent-tflite]'

FROM python:3.11-slim-bookworm
RUN useradd --system --home /var/lib/edgefleet --create-home edgefleet
COPY --from=build /opt/edgefleet /opt/edgefleet
USER edgefleet
WORKDIR /var/lib/edgefleet
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/v1/health')"
ENTRYPOINT ["/opt/edgefleet/bin/edgefleet", "agent", "run"]
CMD ["--config", "/etc/edgefleet/agent.toml"]
