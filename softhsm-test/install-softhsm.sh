#!/usr/bin/env bash
# install-softhsm.sh — make sure SoftHSM2 (Debian package softhsm2) is installed.
#
# Idempotent: does nothing when softhsm2-util and the module are already there.
# Another process's apt-get or dpkg may hold the dpkg lock (CI machines run
# unattended upgrades): apt-get is told to wait for the lock, and the whole
# install is retried a few times with a pause in between.
#
# Prints the module path on success. Needs root (or sudo) only when it has to
# install. Environment:
#   SOFTHSM_INSTALL_TRIES   attempts before giving up (default 5)
#   SOFTHSM_LOCK_TIMEOUT    seconds apt-get waits for the dpkg lock (default 300)
set -euo pipefail

tries=${SOFTHSM_INSTALL_TRIES:-5}
lock_timeout=${SOFTHSM_LOCK_TIMEOUT:-300}

module_path() {
	local p
	for p in /usr/lib/softhsm/libsofthsm2.so \
		/usr/lib/"$(uname -m)"-linux-gnu/softhsm/libsofthsm2.so \
		/usr/local/lib/softhsm/libsofthsm2.so; do
		if [ -f "$p" ]; then
			echo "$p"
			return 0
		fi
	done
	return 1
}

installed() {
	command -v softhsm2-util >/dev/null 2>&1 && module_path >/dev/null
}

if installed; then
	module_path
	exit 0
fi

"$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" install-softhsm.sh "$tries" "$lock_timeout" softhsm2

if ! installed; then
	echo "install-softhsm.sh: softhsm2 installed but softhsm2-util or libsofthsm2.so not found" >&2
	exit 1
fi
module_path
