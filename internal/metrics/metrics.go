// Package metrics holds keyd's Prometheus metrics, on a registry of their
// own (no process-wide default registry).
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/keyd-dev/keyd/rotation"
)

// Metrics are the daemon's metrics. The zero value is not usable; a nil
// *Metrics is, and records nothing.
type Metrics struct {
	reg         *prometheus.Registry
	signs       *prometheus.CounterVec
	signLatency *prometheus.HistogramVec
	denials     *prometheus.CounterVec
	limited     *prometheus.CounterVec
	backendUp   prometheus.Gauge
}

// Versions is what the key-state collector reads at scrape time.
type Versions interface {
	Versions(names ...string) []rotation.Version
	Failures() int64
}

// New makes the metrics of a daemon whose backend is named backend and
// whose keys are in keys.
func New(backend string, keys Versions) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		signs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name:        "keyd_sign_requests_total",
			Help:        "Sign requests by key set, purpose and gRPC code.",
			ConstLabels: prometheus.Labels{"backend": backend},
		}, []string{"keyset", "purpose", "code"}),
		signLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:        "keyd_sign_duration_seconds",
			Help:        "Time to serve a Sign request (policy, backend signature, audit), by key set and purpose.",
			ConstLabels: prometheus.Labels{"backend": backend},
			Buckets:     []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 5},
		}, []string{"keyset", "purpose", "code"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyd_authz_denials_total",
			Help: "Requests refused because the caller may not use the key set or is not an admin.",
		}, []string{"method"}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyd_rate_limited_total",
			Help: "Requests refused by a limit (RESOURCE_EXHAUSTED).",
		}, []string{"limit"}),
		backendUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name:        "keyd_backend_up",
			Help:        "1 while the key store's health check passes, 0 while it fails.",
			ConstLabels: prometheus.Labels{"backend": backend},
		}),
	}
	m.backendUp.Set(1)
	m.reg.MustRegister(m.signs, m.signLatency, m.denials, m.limited, m.backendUp,
		&keyCollector{keys: keys},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the metrics in the Prometheus text format (a nil
// *Metrics: 404 Not Found).
func (m *Metrics) Handler() http.Handler {
	if m == nil {
		return http.NotFoundHandler()
	}
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Sign records one Sign decision.
func (m *Metrics) Sign(keyset, purpose, code string, took time.Duration) {
	if m == nil {
		return
	}
	m.signs.WithLabelValues(keyset, purpose, code).Inc()
	m.signLatency.WithLabelValues(keyset, purpose, code).Observe(took.Seconds())
}

// Denied records an authorization refusal.
func (m *Metrics) Denied(method string) {
	if m != nil {
		m.denials.WithLabelValues(method).Inc()
	}
}

// Limited records a request refused by the named limit.
func (m *Metrics) Limited(limit string) {
	if m != nil {
		m.limited.WithLabelValues(limit).Inc()
	}
}

// BackendUp records the backend's health.
func (m *Metrics) BackendUp(up bool) {
	if m == nil {
		return
	}
	if up {
		m.backendUp.Set(1)
	} else {
		m.backendUp.Set(0)
	}
}

// StreamInFlight reports, at scrape time, the number inFlight returns: the
// SignStream requests taken from their streams and not yet answered (see
// server.Server.StreamItemsInFlight). Call it once.
func (m *Metrics) StreamInFlight(inFlight func() int64) {
	if m == nil {
		return
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "keyd_sign_stream_requests_in_flight",
		Help: "SignStream requests taken from their streams and not yet answered (being authorized, signed, audited, or their result being sent).",
	}, func() float64 { return float64(inFlight()) }))
}

// keyCollector reports key states and ages at scrape time.
type keyCollector struct{ keys Versions }

var (
	keysDesc = prometheus.NewDesc("keyd_keys", "Key versions by key set and state.", []string{"keyset", "state"}, nil)
	ageDesc  = prometheus.NewDesc("keyd_active_key_age_seconds", "Age of each key set's active key since it became active.", []string{"keyset"}, nil)
	rotDesc  = prometheus.NewDesc("keyd_key_activations_total", "Keys that became active (first keys and rotations), by key set, as recorded.", []string{"keyset"}, nil)
	failDesc = prometheus.NewDesc("keyd_rotation_failures_total", "Scheduled key changes that failed and were deferred since start.", nil, nil)
)

func (c *keyCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- keysDesc
	ch <- ageDesc
	ch <- rotDesc
	ch <- failDesc
}

func (c *keyCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	type key struct{ set, state string }
	counts := map[key]int{}
	activations := map[string]int{}
	for _, v := range c.keys.Versions() {
		counts[key{v.KeySet, v.State.String()}]++
		if !v.ActivatedAt.IsZero() {
			activations[v.KeySet]++
		}
		if v.State == rotation.Active {
			ch <- prometheus.MustNewConstMetric(ageDesc, prometheus.GaugeValue, now.Sub(v.ActivatedAt).Seconds(), v.KeySet)
		}
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(keysDesc, prometheus.GaugeValue, float64(n), k.set, k.state)
	}
	for set, n := range activations {
		ch <- prometheus.MustNewConstMetric(rotDesc, prometheus.CounterValue, float64(n), set)
	}
	ch <- prometheus.MustNewConstMetric(failDesc, prometheus.CounterValue, float64(c.keys.Failures()))
}
