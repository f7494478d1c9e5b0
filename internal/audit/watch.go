package audit

import (
	"errors"

	"golang.org/x/sys/unix"
)

// A fileWatch tells the writer whether anything happened to the audit file
// since it last looked, without looking the path up: an inotify watch on the
// file for a rename (logrotate), a change of its link count (an unlink) or
// its attributes, and its deletion. The kernel queues the event before the
// rename or unlink returns, so a write after it sees it, as a write after a
// stat of the path would. A stat of the path on every write cost keyd about
// a tenth of its signing throughput on a 2-core host (make bench, pkcs11
// ES256 at 16 callers); the watch's look is one read that finds nothing.
//
// The watch does not see the audit file's directory renamed or replaced,
// nor a change made by another host to a network file system: the writer
// therefore still looks the path up at least every statEvery.
type fileWatch struct {
	fd  int
	wd  int
	buf []byte
}

// watchMask is what makes the writer look the path up.
const watchMask = unix.IN_MOVE_SELF | unix.IN_ATTRIB | unix.IN_DELETE_SELF

// newFileWatch watches the file at path. It fails where inotify is not
// available (the per-user limit of instances reached, say); the writer then
// looks the path up before every write.
func newFileWatch(path string) (*fileWatch, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, err
	}
	w := &fileWatch{fd: fd, wd: -1, buf: make([]byte, 4096)}
	if err := w.rewatch(path); err != nil {
		w.close()
		return nil, err
	}
	return w, nil
}

// rewatch moves the watch to the file now at path.
func (w *fileWatch) rewatch(path string) error {
	if w.wd >= 0 {
		// Gone already when the old file was deleted (EINVAL).
		_, _ = unix.InotifyRmWatch(w.fd, uint32(w.wd))
		w.wd = -1
	}
	wd, err := unix.InotifyAddWatch(w.fd, path, watchMask|unix.IN_DONT_FOLLOW)
	if err != nil {
		return err
	}
	w.wd = wd
	w.changed() // events of the old file: the caller is looking now
	return nil
}

// changed reports whether an event arrived since the last call, consuming
// the events queued. A failed read counts as a change: the caller then
// looks the path up.
func (w *fileWatch) changed() bool {
	got := false
	for range 16 {
		n, err := unix.Read(w.fd, w.buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			return got
		}
		if err != nil || n <= 0 {
			return true
		}
		got = true
	}
	return true
}

func (w *fileWatch) close() { unix.Close(w.fd) }
