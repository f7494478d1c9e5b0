package main

import (
	"log/slog"
	"sync"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
)

// systemdNotifier tells a service manager that asked for it (NOTIFY_SOCKET,
// set by systemd for Type=notify) when keyd serves (READY=1, only once
// every listener serves and the backend's first health check is done),
// what state it is in (STATUS=, shown by systemctl status) and that it
// stops (STOPPING=1). Without NOTIFY_SOCKET it does nothing.
type systemdNotifier struct {
	log  *slog.Logger
	once sync.Once // the first failure is logged, not every one
}

func (n *systemdNotifier) send(state string) {
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		n.once.Do(func() {
			n.log.Warn("cannot notify the service manager (NOTIFY_SOCKET)", "err", err)
		})
	}
}

func (n *systemdNotifier) ready()             { n.send(sddaemon.SdNotifyReady) }
func (n *systemdNotifier) status(line string) { n.send("STATUS=" + line) }
func (n *systemdNotifier) stopping()          { n.send(sddaemon.SdNotifyStopping) }
