#!/bin/sh
# The entrypoint of the one bianzhi image.
#   serve [SERVICE]  run SERVICE (orgs, quota, ...; else $SERVICE) under uvicorn
#   anything else    run as given, e.g. `bianzhi migrate orgs`
set -eu

if [ "${1:-}" != "serve" ]; then
    exec "$@"
fi
shift
service="${1:-${SERVICE:-}}"
case "$service" in
    "" | *[!a-z]*)
        echo "bianzhi-entrypoint: serve needs a service name (orgs, quota, ...), got '$service'" >&2
        exit 2
        ;;
esac
# Uvicorn stops taking requests on SIGTERM, then the app's shutdown drains the consumers
# (BIANZHI_KAFKA_GRACEFUL_TIMEOUT_S) and the outbox relay; the pod's grace period covers both.
exec uvicorn --factory "services.${service}.entrypoints.app:create_app" \
    --host 0.0.0.0 --port "${PORT:-8000}" \
    --no-access-log --timeout-graceful-shutdown 5
