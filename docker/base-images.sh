#!/usr/bin/env bash
# The base images the compose files need, on hosts with or without a container registry.
#
#   eval "$(docker/base-images.sh)"     # then: docker compose build / up
#
# For each base image (Python for the API and worker images, Redis for the job store)
# the registry's image is used when it is present or can be pulled. Otherwise a local
# stand-in is built from Debian bookworm's packages (Python 3.11, Redis 7): a root
# filesystem made by debootstrap, imported once, then docker/base/python.Dockerfile
# and docker/base/redis.Dockerfile on top of it. Progress goes to stderr; stdout
# carries only the variables the compose files read, ready for eval or a .env file:
#   LIKENESS_PYTHON_IMAGE=...   LIKENESS_REDIS_IMAGE=...
#
# Options: --local builds and uses the stand-ins even where the registry is reachable;
# --rebuild builds them again (security updates) instead of reusing existing ones.
# Environment: LIKENESS_DEBIAN_MIRROR (default http://deb.debian.org/debian);
# LIKENESS_EXTRA_CA_DIR (default /usr/local/share/ca-certificates): the host's own
# certificate authorities, built into the Python stand-in so that pip in the image
# builds trusts what the host trusts (a TLS-inspecting proxy, a private index).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python_official=python:3.11-slim-bookworm
redis_official=redis:7.4-alpine
debian_local=likeness-local/debian:bookworm
python_local=likeness-local/python:3.11-bookworm
redis_local=likeness-local/redis:7-bookworm
mirror=${LIKENESS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
extra_ca_dir=${LIKENESS_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
force_local=0
rebuild=0

for arg in "$@"; do
  case $arg in
    --local) force_local=1 ;;
    --rebuild) rebuild=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    *) echo "base-images.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { echo "base-images: $*" >&2; }
present() { docker image inspect "$1" >/dev/null 2>&1; }
# A failed pull is quick where no registry resolves; the timeout covers slow networks.
pullable() { timeout 600 docker pull "$1" >/dev/null 2>&1; }

debian_root() {
  if present "$debian_local" && [ "$rebuild" = 0 ]; then
    return
  fi
  if ! command -v debootstrap >/dev/null; then
    say "debootstrap is needed to build the base images (apt-get install debootstrap)"
    exit 1
  fi
  local work
  work=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: the trap runs after the function returns
  trap "rm -rf '$work'" EXIT
  say "debootstrap bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase bookworm "$work/root" "$mirror" >&2
  cat >"$work/root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
  # As Debian's slim images do: no documentation, manual pages or translations, now
  # or in the packages installed on top (the API image's size depends on it).
  cat >"$work/root/etc/dpkg/dpkg.cfg.d/slim" <<EXCLUDES
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EXCLUDES
  find "$work/root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  rm -rf "$work/root/usr/share/man/"* "$work/root/usr/share/info/"*
  find "$work/root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
    -exec rm -rf {} +
  rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/cache/apt/"*.bin \
    "$work/root/var/lib/apt/lists/"*
  tar -C "$work/root" --numeric-owner -c . | docker import - "$debian_local" >/dev/null
  rm -rf "$work"
  trap - EXIT
  say "imported $debian_local"
}

stand_in() {
  local image=$1 dockerfile=$2 context
  if present "$image" && [ "$rebuild" = 0 ]; then
    say "using $image (built earlier)"
    return
  fi
  debian_root
  say "building $image from Debian's packages"
  context=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$context'" EXIT
  cp "$here/base/$dockerfile" "$context/Dockerfile"
  mkdir "$context/ca-certificates"
  if [ -d "$extra_ca_dir" ]; then
    find "$extra_ca_dir" -maxdepth 1 -name '*.crt' -exec cp {} "$context/ca-certificates/" \;
  fi
  docker build --force-rm --build-arg "DEBIAN_IMAGE=$debian_local" -t "$image" "$context" >&2
  rm -rf "$context"
  trap - EXIT
}

choose() {
  local official=$1 local_image=$2 dockerfile=$3
  if [ "$force_local" = 0 ] && { present "$official" || pullable "$official"; }; then
    say "using $official"
    echo "$official"
  else
    [ "$force_local" = 1 ] || say "$official cannot be pulled here"
    stand_in "$local_image" "$dockerfile"
    echo "$local_image"
  fi
}

python_image=$(choose "$python_official" "$python_local" python.Dockerfile)
redis_image=$(choose "$redis_official" "$redis_local" redis.Dockerfile)
echo "LIKENESS_PYTHON_IMAGE=$python_image"
echo "LIKENESS_REDIS_IMAGE=$redis_image"
