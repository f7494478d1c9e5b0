#!/usr/bin/env bash
# apt-install.sh — install Debian packages for install-softhsm.sh and
# install-swtpm.sh, patiently.
#
#   apt-install.sh NAME TRIES LOCK_TIMEOUT PACKAGE...
#
# NAME is the calling script's name, for messages. Another process's apt-get
# or dpkg may hold the dpkg lock (CI machines run unattended upgrades):
# apt-get waits LOCK_TIMEOUT seconds for the lock, and the whole install is
# tried TRIES times with a growing pause in between. The package list is
# updated first only when a package is unknown, so a warm machine skips the
# update. Needs root, or sudo without a password. apt-get's output goes to
# stderr.
set -euo pipefail

name=$1
tries=$2
lock_timeout=$3
shift 3
packages=("$@")

sudo=""
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then
		sudo="sudo -n"
	else
		echo "$name: ${packages[*]} missing and this is not root (no sudo): install the Debian packages ${packages[*]}" >&2
		exit 1
	fi
fi

apt_get() {
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$lock_timeout" -y -q "$@"
}

for i in $(seq 1 "$tries"); do
	for p in "${packages[@]}"; do
		if ! apt-cache show "$p" >/dev/null 2>&1; then
			apt_get update >&2 || true
			break
		fi
	done
	if apt_get install --no-install-recommends "${packages[@]}" >&2; then
		exit 0
	fi
	if [ "$i" -eq "$tries" ]; then
		echo "$name: apt-get install ${packages[*]} failed $tries times" >&2
		exit 1
	fi
	echo "$name: apt-get install failed (attempt $i/$tries); the dpkg lock may be held, retrying in $((i * 5))s" >&2
	sleep $((i * 5))
done
