#!/usr/bin/env bash
# A private, throw-away PostgreSQL cluster on loopback, for tests (tools/tests/fleet_postgres.rs).
#
#   scripts/pg-test-cluster.sh start DIR PORT   # initdb into DIR/data, listen on 127.0.0.1:PORT
#   scripts/pg-test-cluster.sh stop DIR         # stop it (DIR can then be deleted)
#
# Uses the Debian binaries under /usr/lib/postgresql/*/bin (apt: postgresql). Trust auth, user
# `kiln`, database `fleet`: the URL is postgres://kiln@127.0.0.1:PORT/fleet (printed by start).
# The cluster and its socket live in DIR/cluster. PostgreSQL refuses to run as root: as root the
# cluster is owned by and run as the `postgres` user (runuser), in a folder of its own under /tmp
# (DIR/cluster links to it; stop deletes it).
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$2

bin=""
for d in /usr/lib/postgresql/*/bin; do
  if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then bin=$d; fi
done
if [ -z "$bin" ]; then
  echo "error: no PostgreSQL binaries under /usr/lib/postgresql/*/bin; install them with: apt-get install postgresql" >&2
  exit 3
fi

as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

case "$cmd" in
  start)
    [ $# -eq 3 ] || usage
    port=$3
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [ "$(id -u)" = 0 ]; then
      # DIR may sit under folders the postgres user cannot enter (a 0700 temporary folder): the
      # cluster goes into a folder of its own under /tmp, and DIR/cluster points at it.
      id postgres >/dev/null 2>&1 || { echo "error: running as root and there is no postgres user to run the cluster as" >&2; exit 3; }
      cluster=$(mktemp -d /tmp/kiln-pg.XXXXXX)
      chown postgres "$cluster"
      ln -sfn "$cluster" "$dir/cluster"
    else
      cluster="$dir/cluster"
      mkdir -p "$cluster"
    fi
    chmod 700 "$cluster"
    # A fresh cluster, owned by the user it runs as; fsync off: it is thrown away.
    as_owner "$bin/initdb" -D "$cluster/data" -U kiln -A trust -E UTF8 --locale=C.UTF-8 --no-sync >"$dir/initdb.log" 2>&1 || {
      cat "$dir/initdb.log" >&2
      exit 1
    }
    if ! as_owner "$bin/pg_ctl" start -D "$cluster/data" -w -t 60 -l "$cluster/postgres.log" \
      -o "-k $cluster -p $port -h 127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >/dev/null; then
      echo "error: PostgreSQL did not start; its log:" >&2
      cat "$cluster/postgres.log" >&2 || true
      exit 1
    fi
    as_owner "$bin/createdb" -h "$cluster" -p "$port" -U kiln fleet
    echo "postgres://kiln@127.0.0.1:$port/fleet"
    ;;
  stop)
    [ -e "$dir/cluster" ] || exit 0
    cluster=$(cd "$dir/cluster" && pwd -P)
    if [ -f "$cluster/data/postmaster.pid" ]; then
      as_owner "$bin/pg_ctl" stop -D "$cluster/data" -m fast -w -t 60 >/dev/null || true
    fi
    if [ -L "$dir/cluster" ]; then
      rm -rf "$cluster"
      rm -f "$dir/cluster"
    fi
    ;;
  *)
    usage
    ;;
esac
