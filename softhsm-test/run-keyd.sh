#!/usr/bin/env bash
# run-keyd.sh — start keyd in the foreground on a fresh, throw-away device:
#
#   run-keyd.sh softhsm   a new SoftHSM2 token (installs softhsm2 if missing)
#   run-keyd.sh swtpm     a new swtpm on loopback (installs swtpm if missing)
#
# It writes a configuration with a dpop key set (ES256) and a
# client_assertion key set (ES256) that the current user may use, prints it,
# and runs bin/keyd serve with it. Everything lives in one temporary
# directory, printed at the start; Ctrl-C stops keyd (and swtpm) and leaves
# the directory for inspection. Used by `make run-softhsm` and `make run-swtpm`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
kind=${1:-}
case "$kind" in
softhsm | swtpm) ;;
*)
	echo "usage: $0 softhsm|swtpm" >&2
	exit 2
	;;
esac

dir=$(mktemp -d /tmp/keyd-"$kind".XXXXXX)
uid=$(id -u)
echo "run-keyd.sh: working directory $dir" >&2

cleanup() { :; }
case "$kind" in
softhsm)
	"$here/install-softhsm.sh" >/dev/null
	eval "$(SOFTHSM_TEST_DIR="$dir/softhsm" "$here/new-token.sh" keyd)"
	backend=$(printf '  pkcs11:\n    module: %s\n    uri: "%s"\n    pin_file: %s\n    max_sessions: 2' \
		"$KEYD_PKCS11_MODULE" "$KEYD_PKCS11_URI" "$KEYD_PKCS11_PIN_FILE")
	;;
swtpm)
	"$here/install-swtpm.sh" >/dev/null
	eval "$(SWTPM_NO_INSTALL=1 "$here/swtpm.sh" start -d "$dir/swtpm")"
	cleanup() { "$here/swtpm.sh" stop "$dir/swtpm" || true; }
	backend=$(printf '  tpm:\n    address: %s' "$KEYD_TPM_ADDRESS")
	;;
esac
trap cleanup EXIT

cat >"$dir/keyd.yaml" <<CONFIG
socket: $dir/keyd.sock
socket_mode: "0600"
state_dir: $dir/state
backend:
$backend
keysets:
  - name: dpop
    purpose: dpop
    alg: ES256
    allow: {uids: [$uid]}
  - name: assertion
    purpose: client_assertion
    alg: ES256
    client_id: example-client
    audience: https://issuer.example.com
    allow: {uids: [$uid]}
CONFIG
echo "run-keyd.sh: configuration $dir/keyd.yaml:" >&2
sed 's/^/    /' "$dir/keyd.yaml" >&2
echo "run-keyd.sh: from another shell:" >&2
echo "    export KEYD_SOCKET=$dir/keyd.sock" >&2
echo "    $root/bin/keyd proof --keyset dpop --htm GET --htu https://api.example.com/resource" >&2
echo "    $root/bin/keyd assertion --keyset assertion" >&2
"$root/bin/keyd" serve --config "$dir/keyd.yaml"
