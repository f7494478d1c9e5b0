package server_test

import (
	"testing"
)

// BenchmarkProof measures one DPoP proof through the client and the server
// over a real Unix socket in one process (gRPC both ways, policy, soft
// ES256 signature, the in-memory audit), with its allocations: keyd's
// per-signature cost beside the backend's.
func BenchmarkProof(b *testing.B) {
	for _, par := range []int{1, 8} {
		b.Run(map[int]string{1: "serial", 8: "parallel"}[par], func(b *testing.B) {
			e := newEnv(b, defaultSets[:1], envOpts{})
			dp := e.cl.DPoP("dpop")
			b.ReportAllocs()
			b.SetParallelism(par)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := dp.Proof(b.Context(), "GET", "https://a.example/"); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
