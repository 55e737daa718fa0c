#!/bin/sh
# The smoke test's stand-in for the official postgres image's entrypoint, for a PostgreSQL
# image built from Debian's package: on an empty $PGDATA it creates the cluster with
# POSTGRES_USER as superuser (password POSTGRES_PASSWORD, asked of every TCP client) and the
# database POSTGRES_DB, then runs the server as the postgres user.
set -eu
: "${POSTGRES_PASSWORD:?is required}"
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}

if [ "$(id -u)" = 0 ]; then
    # A new named volume is root's: hand it and the socket folder to postgres, then drop root.
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$password"
    initdb -D "$PGDATA" -U "$user" --pwfile="$password" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256
    rm "$password"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        # On the socket only, so no client sees the database before it is ready.
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
        psql -v ON_ERROR_STOP=1 -U "$user" -d postgres -c "CREATE DATABASE \"$db\""
        pg_ctl -D "$PGDATA" -m fast -w stop
    fi
fi
exec "$@"
