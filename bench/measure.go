package main

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// op is one measured operation.
type op func(ctx context.Context) error

// recorder holds one latency buffer per caller, allocated once up front and
// reused by every run, so that recording a latency never allocates.
type recorder struct {
	slots  [][]time.Duration
	merged []time.Duration
}

// newRecorder sizes the buffers for runs of dur with the given caller
// counts, assuming at most perCallerRate ops/s from one caller alone and
// twice a fair share of it when several share the machine. A run that does
// more still works: the buffer grows (once) by append.
func newRecorder(callers []int, dur time.Duration, perCallerRate float64) *recorder {
	maxC := slices.Max(callers)
	r := &recorder{slots: make([][]time.Duration, maxC)}
	total := 0
	for i := range r.slots {
		// The fewest callers of any run that uses slot i.
		c := maxC
		for _, n := range callers {
			if n > i && n < c {
				c = n
			}
		}
		share := 1.0
		if c > 1 {
			share = 2.0 / float64(c)
		}
		n := int(dur.Seconds()*perCallerRate*share) + 1024
		r.slots[i] = make([]time.Duration, 0, n)
		total += n
	}
	r.merged = make([]time.Duration, 0, total)
	return r
}

// runStats is what one run measured.
type runStats struct {
	ops     int
	elapsed time.Duration
	p50     time.Duration
	p99     time.Duration
	mean    time.Duration
}

func (s runStats) opsPerSec() float64 { return float64(s.ops) / s.elapsed.Seconds() }

// measure runs o from callers goroutines for warmup (discarded), then for
// dur, recording every latency, and returns the statistics of the second
// phase. The first error of any caller ends the run.
func (r *recorder) measure(ctx context.Context, callers int, warmup, dur time.Duration, o op) (runStats, error) {
	if warmup > 0 {
		if _, err := r.phase(ctx, callers, warmup, o); err != nil {
			return runStats{}, err
		}
	}
	elapsed, err := r.phase(ctx, callers, dur, o)
	if err != nil {
		return runStats{}, err
	}
	r.merged = r.merged[:0]
	for _, s := range r.slots[:callers] {
		r.merged = append(r.merged, s...)
	}
	slices.Sort(r.merged)
	st := runStats{ops: len(r.merged), elapsed: elapsed}
	if st.ops == 0 {
		return st, fmt.Errorf("no operation completed in %v", dur)
	}
	st.p50 = percentile(r.merged, 0.50)
	st.p99 = percentile(r.merged, 0.99)
	var sum time.Duration
	for _, d := range r.merged {
		sum += d
	}
	st.mean = sum / time.Duration(st.ops)
	return st, nil
}

// phase runs o from callers goroutines until dur has passed and returns the
// time from the start until the last caller finished its last operation.
func (r *recorder) phase(ctx context.Context, callers int, dur time.Duration, o op) (time.Duration, error) {
	var (
		wg       sync.WaitGroup
		stop     atomic.Bool
		errOnce  sync.Once
		firstErr error
		start    = make(chan struct{})
		deadline time.Time
	)
	for i := 0; i < callers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			lat := r.slots[i][:0]
			<-start
			for !stop.Load() {
				t0 := time.Now()
				if err := o(ctx); err != nil {
					errOnce.Do(func() { firstErr = err })
					stop.Store(true)
					break
				}
				t1 := time.Now()
				lat = append(lat, t1.Sub(t0))
				if t1.After(deadline) {
					break
				}
			}
			r.slots[i] = lat
		}(i)
	}
	t0 := time.Now()
	deadline = t0.Add(dur)
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	if firstErr != nil {
		return 0, firstErr
	}
	return elapsed, nil
}

// percentile returns the q-quantile (nearest rank) of sorted, which must not
// be empty.
func percentile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	i = max(0, min(i, len(sorted)-1))
	return sorted[i]
}
