#!/usr/bin/env bash
# install-swtpm.sh — make sure swtpm and tpm2-tools are installed (Debian
# packages swtpm, swtpm-tools, tpm2-tools and the swtpm TCTI of tpm2-tss).
#
# Idempotent: does nothing when swtpm, swtpm_ioctl, tpm2_getcap and tpm2_clear
# are already there and the swtpm TCTI library is present. Another process's
# apt-get or dpkg may hold the dpkg lock (CI machines run unattended upgrades):
# apt-get is told to wait for the lock, and the whole install is retried a few
# times with a pause in between.
#
# Prints the path of swtpm on success. Needs root (or sudo) only when it has to
# install. Environment:
#   SWTPM_INSTALL_TRIES   attempts before giving up (default 5)
#   SWTPM_LOCK_TIMEOUT    seconds apt-get waits for the dpkg lock (default 300)
set -euo pipefail

tries=${SWTPM_INSTALL_TRIES:-5}
lock_timeout=${SWTPM_LOCK_TIMEOUT:-300}
packages=(swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0)

tcti_present() {
	local d
	for d in /usr/lib/"$(uname -m)"-linux-gnu /usr/lib /usr/local/lib; do
		if compgen -G "$d/libtss2-tcti-swtpm.so*" >/dev/null; then
			return 0
		fi
	done
	return 1
}

installed() {
	command -v swtpm >/dev/null 2>&1 &&
		command -v swtpm_ioctl >/dev/null 2>&1 &&
		command -v tpm2_getcap >/dev/null 2>&1 &&
		command -v tpm2_clear >/dev/null 2>&1 &&
		tcti_present
}

if installed; then
	command -v swtpm
	exit 0
fi

"$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" install-swtpm.sh "$tries" "$lock_timeout" "${packages[@]}"

if ! installed; then
	echo "install-swtpm.sh: packages installed but swtpm, swtpm_ioctl, tpm2_getcap, tpm2_clear or the swtpm TCTI is missing" >&2
	exit 1
fi
command -v swtpm
