# metacenter node: twistd metacenter on :8080 as a non-root user.
# Linted by hadolint in `make test` (tests/deploy/test_manifests.py): no findings.
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.py README.md ./
COPY metacenter ./metacenter
COPY console ./console
COPY twisted ./twisted
# A regular install (not -e): an editable install hides twisted/plugins from twistd.
RUN pip install --no-cache-dir --prefix=/install . \
 && rm -f /install/lib/python3.11/site-packages/twisted/plugins/dropin.cache

FROM python:3.11-slim
COPY --from=build /install /usr/local
# Build twistd's plugin cache now, as root, so the non-root user never has to
# write into site-packages.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin metacenter
USER 10001
WORKDIR /tmp
EXPOSE 8080
ENV PYTHONUNBUFFERED=1
CMD ["twistd", "--nodaemon", "--pidfile=", "metacenter"]
