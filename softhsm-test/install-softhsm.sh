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

sudo=""
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then
		sudo="sudo -n"
	else
		echo "install-softhsm.sh: softhsm2 is missing and this is not root (no sudo): install the Debian package softhsm2" >&2
		exit 1
	fi
fi

apt_get() {
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$lock_timeout" -y -q "$@"
}

for i in $(seq 1 "$tries"); do
	# A stale or missing package list makes the install fail; update first
	# only when the package is unknown, so a warm machine skips the update.
	if ! apt-cache show softhsm2 >/dev/null 2>&1; then
		apt_get update >&2 || true
	fi
	if apt_get install --no-install-recommends softhsm2 >&2; then
		break
	fi
	if [ "$i" -eq "$tries" ]; then
		echo "install-softhsm.sh: apt-get install softhsm2 failed $tries times" >&2
		exit 1
	fi
	echo "install-softhsm.sh: apt-get install failed (attempt $i/$tries); the dpkg lock may be held, retrying in $((i * 5))s" >&2
	sleep $((i * 5))
done

if ! installed; then
	echo "install-softhsm.sh: softhsm2 installed but softhsm2-util or libsofthsm2.so not found" >&2
	exit 1
fi
module_path
