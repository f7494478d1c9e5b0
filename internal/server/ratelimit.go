package server

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// limiter is a token bucket per caller, so one service that signs in a loop
// cannot starve the others. Buckets of callers idle for a minute are
// dropped; the table is bounded.
type limiter struct {
	rate  rate.Limit
	burst int

	mu      sync.Mutex
	buckets map[string]*bucket
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time
}

const maxBuckets = 10000

func newLimiter(perSecond float64, burst int) *limiter {
	if perSecond <= 0 {
		return nil
	}
	if burst <= 0 {
		burst = max(1, int(perSecond))
	}
	return &limiter{rate: rate.Limit(perSecond), burst: burst, buckets: map[string]*bucket{}}
}

// allow takes one token from key's bucket.
func (l *limiter) allow(key string, now time.Time) bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[key]
	if b == nil {
		if len(l.buckets) >= maxBuckets {
			for k, x := range l.buckets {
				if now.Sub(x.last) > time.Minute {
					delete(l.buckets, k)
				}
			}
			if len(l.buckets) >= maxBuckets {
				clear(l.buckets)
			}
		}
		b = &bucket{lim: rate.NewLimiter(l.rate, l.burst)}
		l.buckets[key] = b
	}
	b.last = now
	return b.lim.AllowN(now, 1)
}
