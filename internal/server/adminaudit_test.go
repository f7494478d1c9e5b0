package server_test

import (
	"os"
	"testing"

	"github.com/keyd-dev/keyd/internal/audit"
)

// Who rotated or revoked a key, and who was refused, is in the audit log
// beside the signatures: admin calls are recorded as decisions too.
func TestAdminCallsAudited(t *testing.T) {
	e := newEnv(t, defaultSets[:1], envOpts{})
	rot, err := e.cl.Rotate(ctx(t), "dpop", true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.cl.Revoke(ctx(t), rot.Previous.Kid, "dpop"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.cl.Revoke(ctx(t), "no-such-kid", ""); err == nil {
		t.Fatal("revoke of an unknown kid succeeded")
	}
	if _, err := e.cl.Rotate(ctx(t), "nope", true); err == nil {
		t.Fatal("rotate of an unknown key set succeeded")
	}
	refused := newEnv(t, defaultSets[:1], envOpts{admins: []int{4242}})
	if _, err := refused.cl.Rotate(ctx(t), "dpop", true); err == nil {
		t.Fatal("rotate by a caller who is not an admin succeeded")
	}

	uid := uint32(os.Geteuid())
	want := []audit.Record{
		{Event: "rotate", KeySet: "dpop", Kid: rot.Active.Kid, Outcome: "ok"},
		{Event: "revoke", KeySet: "dpop", Kid: rot.Previous.Kid, Outcome: "ok"},
		{Event: "revoke", Kid: "no-such-kid", Outcome: "NotFound"},
		{Event: "rotate", KeySet: "nope", Outcome: "PermissionDenied"},
	}
	var got []audit.Record
	for _, r := range e.audit.records() {
		if r.Event != "sign" {
			got = append(got, r)
		}
	}
	got = append(got, refused.audit.records()...)
	want = append(want, audit.Record{Event: "rotate", KeySet: "dpop", Outcome: "PermissionDenied"})
	if len(got) != len(want) {
		t.Fatalf("admin audit records %+v; want %d", got, len(want))
	}
	for i, w := range want {
		g := got[i]
		if g.Event != w.Event || g.KeySet != w.KeySet || g.Kid != w.Kid || g.Outcome != w.Outcome || g.UID != uid || g.Time.IsZero() {
			t.Errorf("record %d = %+v; want %s of %q/%q by uid %d, %s", i, g, w.Event, w.KeySet, w.Kid, uid, w.Outcome)
		}
		if w.Outcome != "ok" && g.Reason == "" {
			t.Errorf("record %d (%s) gives no reason", i, w.Outcome)
		}
	}
}
