#!/usr/bin/env bash
# swtpm.sh — start or stop a throw-away swtpm (TPM 2.0 simulator) on loopback,
# for keyd's TPM tests and for trying the tpm backend by hand.
#
#   swtpm.sh start [-d STATE_DIR] [-p PORT]
#       Starts `swtpm socket --tpm2` in the background with its state in
#       STATE_DIR (default: a new directory from mktemp; an existing one is
#       reused, which is how a test "restarts" the same TPM), the TPM command
#       port on 127.0.0.1:PORT and the control port on PORT+1. Without -p a
#       free pair of ports is chosen (and another is tried if swtpm cannot
#       bind). The TPM is started with TPM2_Startup(CLEAR). Installs swtpm and
#       tpm2-tools with install-swtpm.sh when they are missing, unless
#       SWTPM_NO_INSTALL=1.
#       Prints shell exports on stdout, to use as  eval "$(swtpm.sh start)":
#         KEYD_TPM_ADDRESS    tcp://127.0.0.1:PORT  (keyd's backend: tpm: address)
#         KEYD_TPM_CTRL       127.0.0.1:PORT+1      (swtpm_ioctl --tcp …)
#         KEYD_TPM_STATE_DIR  STATE_DIR
#         KEYD_TPM_PIDFILE    STATE_DIR/swtpm.pid
#         KEYD_TPM_PID        the swtpm process id
#         TPM2TOOLS_TCTI      swtpm:host=127.0.0.1,port=PORT  (tpm2_getcap, tpm2_clear…)
#
#   swtpm.sh stop STATE_DIR
#       Kills the swtpm whose PID is in STATE_DIR/swtpm.pid (SIGCONT first, in
#       case a test stopped it) and waits until it is gone. The state
#       directory is left in place.
#
# Environment: SWTPM_PORT (instead of -p), SWTPM_STATE_DIR (instead of -d),
# SWTPM_NO_INSTALL=1 (fail instead of installing).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=swtpm.sh

die() {
	echo "$prog: $*" >&2
	exit 1
}

usage() {
	echo "usage: $prog start [-d STATE_DIR] [-p PORT] | $prog stop STATE_DIR" >&2
	exit 2
}

# port_busy PORT: something accepts connections on 127.0.0.1:PORT.
port_busy() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_port PORT PID: wait until PORT accepts connections, or PID is gone.
wait_port() {
	local i
	for i in $(seq 1 100); do
		if port_busy "$1"; then
			return 0
		fi
		if ! kill -0 "$2" 2>/dev/null; then
			return 1
		fi
		sleep 0.05
	done
	return 1
}

pid_of() {
	local f=$1/swtpm.pid
	[ -s "$f" ] || return 1
	local pid
	pid=$(tr -dc '0-9' <"$f")
	[ -n "$pid" ] || return 1
	echo "$pid"
}

stop() {
	local dir=$1 pid i
	[ -d "$dir" ] || die "no state directory $dir"
	if ! pid=$(pid_of "$dir"); then
		return 0
	fi
	# Only kill what is really a swtpm using this state directory: the PID
	# file may be stale and the number reused.
	if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "swtpm.*$dir"; then
		kill -CONT "$pid" 2>/dev/null || true
		kill -TERM "$pid" 2>/dev/null || true
		for i in $(seq 1 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.05
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$dir/swtpm.pid"
}

start() {
	local dir=${SWTPM_STATE_DIR:-} port=${SWTPM_PORT:-} opt
	OPTIND=1
	while getopts "d:p:" opt; do
		case $opt in
		d) dir=$OPTARG ;;
		p) port=$OPTARG ;;
		*) usage ;;
		esac
	done
	shift $((OPTIND - 1))
	[ $# -eq 0 ] || usage

	if ! command -v swtpm >/dev/null 2>&1 || ! command -v swtpm_ioctl >/dev/null 2>&1; then
		[ "${SWTPM_NO_INSTALL:-0}" != 1 ] || die "swtpm is not installed (run $here/install-swtpm.sh)"
		"$here/install-swtpm.sh" >/dev/null
	fi

	local made=""
	if [ -z "$dir" ]; then
		dir=$(mktemp -d "${TMPDIR:-/tmp}/swtpm.XXXXXX")
		made=$dir
	fi
	mkdir -p "$dir"
	chmod 700 "$dir"
	dir=$(cd "$dir" && pwd)
	if pid=$(pid_of "$dir") && kill -0 "$pid" 2>/dev/null; then
		die "a swtpm (pid $pid) already runs on $dir; stop it first"
	fi

	local tries=1 fixed=0
	if [ -n "$port" ]; then
		fixed=1
		[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1024 ] && [ "$port" -le 65533 ] || die "bad port $port"
	else
		tries=20
	fi
	local i p="" pid log=$dir/swtpm.log started=0
	for i in $(seq 1 "$tries"); do
		if [ "$fixed" = 1 ]; then
			p=$port
		else
			# A random even port in 20000..59998 whose pair looks free;
			# another process may still take it first, and then swtpm's
			# bind fails and the next candidate is tried.
			p=$((20000 + (RANDOM * 32768 + RANDOM) % 20000 * 2))
			if port_busy "$p" || port_busy "$((p + 1))"; then
				continue
			fi
		fi
		rm -f "$dir/swtpm.pid"
		if swtpm socket --tpm2 \
			--tpmstate dir="$dir" \
			--server type=tcp,port="$p",bindaddr=127.0.0.1 \
			--ctrl type=tcp,port="$((p + 1))",bindaddr=127.0.0.1 \
			--flags not-need-init,startup-clear \
			--pid file="$dir/swtpm.pid" \
			--log file="$log",level=1 \
			--daemon 2>>"$log"; then
			if pid=$(pid_of "$dir") && wait_port "$((p + 1))" "$pid" && wait_port "$p" "$pid"; then
				port=$p
				started=1
				break
			fi
			stop "$dir"
		fi
		if [ "$fixed" = 1 ]; then
			break
		fi
	done
	if [ "$started" != 1 ]; then
		local why
		why=$(tail -n 3 "$log" 2>/dev/null | tr '\n' ' ')
		[ -z "$made" ] || rm -rf "$made"
		die "swtpm did not start on 127.0.0.1 (last port tried: ${p:-none}): ${why:-no free port pair found}"
	fi

	cat <<EOF
export KEYD_TPM_ADDRESS=tcp://127.0.0.1:$port
export KEYD_TPM_CTRL=127.0.0.1:$((port + 1))
export KEYD_TPM_STATE_DIR=$dir
export KEYD_TPM_PIDFILE=$dir/swtpm.pid
export KEYD_TPM_PID=$pid
export TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=$port
EOF
}

case ${1:-} in
start)
	shift
	start "$@"
	;;
stop)
	[ $# -eq 2 ] || usage
	stop "$2"
	;;
*) usage ;;
esac
