package main

import (
	"runtime/debug"
	"strconv"
)

// serveGCPercent is the Go garbage collector's target (GOGC) of keyd serve
// when the environment sets none: the heap may grow to three times what is
// live before a collection, instead of Go's default of twice.
//
// keyd's live heap is small (a few MiB plus about 100 KiB per connection),
// and every signature allocates a few KiB that die at once (the request,
// the claims, the JWS, the audit line), so under load the default collects
// several times a second, and each collection's marking competes for the
// same cores as the signing. On a 2-core host under make bench's 16-caller
// PKCS#11 ES256 load, keyd's throughput relative to the direct baseline
// read 0.80 0.73 0.81 0.84 at GOGC 100 and 0.86 0.89 0.83 0.82 at 200
// (alternated side by side; 400 read 0.88 0.85 0.98 0.82). keyd's peak
// resident memory under the soft section's load: 25 MiB at 100, 29 at
// 200, 37 at 400, against the 40 MiB goal. An operator who prefers memory
// to throughput, or the reverse, sets GOGC (and GOMEMLIMIT) in keyd's
// environment, which then wins.
const serveGCPercent = 200

// tuneGC sets serveGCPercent unless GOGC is set (getenv is os.Getenv). It
// returns the GOGC now in force, as text, for keyd's start-up log line.
func tuneGC(getenv func(string) string) string {
	if v := getenv("GOGC"); v != "" {
		return v + " (from the environment)"
	}
	debug.SetGCPercent(serveGCPercent)
	return strconv.Itoa(serveGCPercent)
}
