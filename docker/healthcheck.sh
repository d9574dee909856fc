#!/bin/bash
# Container health probe (Dockerfile HEALTHCHECK): GET /health/live at LADIC_BIND
# (loopback when it names every address) and succeed on HTTP 200. Only bash builtins,
# so the slim runtime image needs no curl. Usage: ladic-healthcheck [PATH]   (default
# /health/live)
set -u
path="${1:-/health/live}"
bind="${LADIC_BIND:-0.0.0.0:8080}"
port="${bind##*:}"
host="${bind%:*}"
host="${host#[}"
host="${host%]}"
case "$host" in
  0.0.0.0 | "" ) host=127.0.0.1 ;;
  :: ) host=::1 ;;
esac
exec 3<>"/dev/tcp/${host}/${port}" || exit 1
printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$path" >&3
IFS= read -r -t 2 status <&3 || exit 1
[[ "$status" == "HTTP/1."?" 200 "* ]]
