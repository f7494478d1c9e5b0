#!/usr/bin/env bash
# new-token.sh — create a fresh SoftHSM2 token in a temporary directory of its
# own and print the shell exports that point at it.
#
# Usage: eval "$(softhsm-test/new-token.sh [LABEL])"
#
# It makes DIR (mktemp -d, or $SOFTHSM_TEST_DIR if set and empty) holding
#   DIR/softhsm2.conf   directories.tokendir = DIR/tokens, objectstore.backend = file
#   DIR/tokens/         the token
#   DIR/pin             the user PIN, mode 0600, no trailing newline
# and prints:
#   export SOFTHSM2_CONF=DIR/softhsm2.conf
#   export KEYD_PKCS11_MODULE=/usr/lib/softhsm/libsofthsm2.so
#   export KEYD_PKCS11_TOKEN=LABEL
#   export KEYD_PKCS11_URI='pkcs11:token=LABEL'
#   export KEYD_PKCS11_PIN_FILE=DIR/pin
#   export KEYD_SOFTHSM_DIR=DIR
# Remove the token with: rm -rf "$KEYD_SOFTHSM_DIR"
#
# The token is initialised with softhsm2-util --init-token --free, which
# gives it a random-looking slot id: select it by label (or serial), never by
# slot number. SO PIN and user PIN are test values ($SOFTHSM_SO_PIN, default
# 1111; $SOFTHSM_PIN, default 2222): never use this script for real keys.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
label=${1:-keyd}
so_pin=${SOFTHSM_SO_PIN:-1111}
pin=${SOFTHSM_PIN:-2222}

# The label is 1–32 characters and goes into a URI path attribute; keep it to
# characters that need no percent-encoding.
if ! [[ $label =~ ^[A-Za-z0-9._-]{1,32}$ ]]; then
	echo "new-token.sh: label $label: want 1-32 characters from [A-Za-z0-9._-]" >&2
	exit 2
fi

module=$("$here/install-softhsm.sh")

if [ -n "${SOFTHSM_TEST_DIR:-}" ]; then
	dir=$SOFTHSM_TEST_DIR
	mkdir -p "$dir"
	if [ -n "$(ls -A "$dir")" ]; then
		echo "new-token.sh: $dir is not empty" >&2
		exit 1
	fi
else
	dir=$(mktemp -d "${TMPDIR:-/tmp}/keyd-softhsm.XXXXXX")
fi
chmod 0700 "$dir"
mkdir -m 0700 "$dir/tokens"
cat >"$dir/softhsm2.conf" <<CONF
# SoftHSM2 configuration for one keyd test token (new-token.sh).
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF

if ! SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free \
	--label "$label" --so-pin "$so_pin" --pin "$pin" >&2; then
	rm -rf "$dir"
	echo "new-token.sh: softhsm2-util --init-token failed" >&2
	exit 1
fi
(umask 077 && printf '%s' "$pin" >"$dir/pin")

q() { printf '%q' "$1"; }
echo "export SOFTHSM2_CONF=$(q "$dir/softhsm2.conf")"
echo "export KEYD_PKCS11_MODULE=$(q "$module")"
echo "export KEYD_PKCS11_TOKEN=$(q "$label")"
echo "export KEYD_PKCS11_URI=$(q "pkcs11:token=$label")"
echo "export KEYD_PKCS11_PIN_FILE=$(q "$dir/pin")"
echo "export KEYD_SOFTHSM_DIR=$(q "$dir")"
