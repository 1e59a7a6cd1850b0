#!/usr/bin/env bash
# Install (Debian package `postgresql`) and start a local PostgreSQL on loopback for
# tests/test_postgres.py, as root. Prints the connection URI on stdout (everything else on stderr):
#   export SST_LAB_TEST_POSTGRES_URI=$(bash scripts/ci_postgres.sh)
# The test then starts its own `mlflow server --backend-store-uri $SST_LAB_TEST_POSTGRES_URI
# --host 127.0.0.1 --port <free port>`. Idempotent: a second call reuses the running cluster.
set -euo pipefail
DB=${SST_LAB_PG_DB:-sstlab_test}
ROLE=${SST_LAB_PG_USER:-sstlab}
PASSWORD=${SST_LAB_PG_PASSWORD:-sstlab}
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "[ci_postgres] apt-get install postgresql" >&2
  apt-get update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >&2
fi
VERSION=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VERSION main"; then
  pg_createcluster "$VERSION" main >&2
fi
echo "listen_addresses = '127.0.0.1'" > "/etc/postgresql/$VERSION/main/conf.d/sst-lab.conf"   # loopback only
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $4}' | grep -qx online; then
  pg_ctlcluster "$VERSION" main start >&2
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $3}')
psql_() { su postgres -c "psql -p $PORT -v ON_ERROR_STOP=1 -tAc \"$1\""; }
for _ in $(seq 1 30); do psql_ "SELECT 1" >/dev/null 2>&1 && break; sleep 1; done
[ "$(psql_ "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'")" = 1 ] \
  || psql_ "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'" >&2
[ "$(psql_ "SELECT 1 FROM pg_database WHERE datname='$DB'")" = 1 ] \
  || su postgres -c "createdb -p $PORT -O $ROLE $DB" >&2
echo "[ci_postgres] PostgreSQL $VERSION on 127.0.0.1:$PORT, database $DB, role $ROLE" >&2
echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
