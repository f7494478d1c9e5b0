// Package cgoblock lets the pkcs11 package's tests block inside a C call, as
// a hung HSM module does, so they can check that the OS thread count stays
// bounded: a goroutine in a C call holds an OS thread.
package cgoblock

/*
#include <unistd.h>
*/
import "C"

import "time"

// Sleep sleeps for d inside C (usleep).
func Sleep(d time.Duration) {
	C.usleep(C.useconds_t(d / time.Microsecond))
}
