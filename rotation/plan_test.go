package rotation

import (
	"reflect"
	"testing"
	"time"
)

var t0 = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

func at(d time.Duration) time.Time { return t0.Add(d) }

func TestPlan(t *testing.T) {
	sched := Schedule{Period: 24 * time.Hour, Prepublish: time.Hour, Drain: 2 * time.Hour, Retain: 24 * time.Hour}
	noSched := Schedule{Drain: time.Hour, Retain: time.Hour}
	active := func(kid string, activated time.Duration) Version {
		return Version{Kid: kid, State: Active, CreatedAt: at(activated), ActivatedAt: at(activated), DeactivateAt: at(activated + sched.Period)}
	}
	next := func(kid string, activateAt time.Duration) Version {
		return Version{Kid: kid, State: Next, CreatedAt: at(activateAt - time.Hour), ActivateAt: at(activateAt)}
	}
	draining := func(kid string, retire time.Duration) Version {
		return Version{Kid: kid, State: Draining, CreatedAt: at(-48 * time.Hour), RetireAt: at(retire)}
	}
	retired := func(kid string, destroy time.Duration) Version {
		return Version{Kid: kid, State: Retired, CreatedAt: at(-72 * time.Hour), DestroyAt: at(destroy)}
	}
	cases := []struct {
		name string
		now  time.Duration
		s    Schedule
		vs   []Version
		want []Action
	}{
		{"first start: no keys", 0, sched, nil, []Action{{Kind: CreateActive}}},
		{"first start without schedule", 0, noSched, nil, []Action{{Kind: CreateActive}}},
		{"active, long before prepublish", 10 * time.Hour, sched, []Version{active("a", 0)}, nil},
		{"active, just before prepublish", 23*time.Hour - time.Nanosecond, sched, []Version{active("a", 0)}, nil},
		{"active, at prepublish", 23 * time.Hour, sched, []Version{active("a", 0)}, []Action{{Kind: CreateNext, ActivateAt: at(24 * time.Hour)}}},
		{"active, prepublish missed (backend was down)", 25 * time.Hour, sched, []Version{active("a", 0)},
			[]Action{{Kind: CreateNext, ActivateAt: at(26 * time.Hour)}}},
		{"no schedule: active forever", 1000 * time.Hour, noSched, []Version{{Kid: "a", State: Active, ActivatedAt: t0}}, nil},
		// Activated while the key set had no period: a period added to
		// the configuration later counts from the activation.
		{"period added later, not yet due", 10 * time.Hour, sched, []Version{{Kid: "a", State: Active, ActivatedAt: t0}}, nil},
		{"period added later, due", 240 * time.Hour, sched, []Version{{Kid: "a", State: Active, ActivatedAt: t0}},
			[]Action{{Kind: CreateNext, ActivateAt: at(241 * time.Hour)}}},
		{"next published, before activation", 23*time.Hour + 30*time.Minute, sched, []Version{active("a", 0), next("b", 24*time.Hour)}, nil},
		{"next published, just before activation", 24*time.Hour - time.Nanosecond, sched, []Version{active("a", 0), next("b", 24*time.Hour)}, nil},
		{"next published, at activation", 24 * time.Hour, sched, []Version{active("a", 0), next("b", 24*time.Hour)}, []Action{{Kind: Activate, Kid: "b"}}},
		{"next without active (a revoke interrupted): activate at once", time.Hour, sched, []Version{next("b", 2*time.Hour)}, []Action{{Kind: Activate, Kid: "b"}}},
		{"next with a lost active: wait for its time", time.Hour, sched, []Version{{Kid: "a", State: Lost, LostFrom: Active}, next("b", 2*time.Hour)}, nil},
		{"next without active, due", 2 * time.Hour, sched, []Version{next("b", 2*time.Hour)}, []Action{{Kind: Activate, Kid: "b"}}},
		{"draining, before retire", time.Hour, sched, []Version{active("b", 0), draining("a", 2*time.Hour)}, nil},
		{"draining, just before retire", 2*time.Hour - time.Nanosecond, sched, []Version{active("b", 0), draining("a", 2*time.Hour)}, nil},
		{"draining, at retire", 2 * time.Hour, sched, []Version{active("b", 0), draining("a", 2*time.Hour)}, []Action{{Kind: Retire, Kid: "a"}}},
		{"draining without retire time stays", 1000 * time.Hour, noSched, []Version{{Kid: "b", State: Active}, {Kid: "a", State: Draining}}, nil},
		{"retired, before destroy", time.Hour, sched, []Version{active("b", 0), retired("a", 2*time.Hour)}, nil},
		{"retired, at destroy", 2 * time.Hour, sched, []Version{active("b", 0), retired("a", 2*time.Hour)}, []Action{{Kind: Destroy, Kid: "a"}}},
		{"revoked, at destroy", 2 * time.Hour, sched, []Version{active("b", 0), {Kid: "r", State: Revoked, DestroyAt: at(2 * time.Hour)}}, []Action{{Kind: Destroy, Kid: "r"}}},
		{"revoked without destroy time stays", 1000 * time.Hour, sched, []Version{active("b", 999*time.Hour), {Kid: "r", State: Revoked}}, nil},
		{"destroyed and pending are ignored", 0, noSched, []Version{{Kid: "b", State: Active}, {Kid: "x", State: Destroyed}, {ID: "p", State: Pending}}, nil},
		{"lost active: no automatic replacement", 0, sched, []Version{{Kid: "a", State: Lost}}, nil},
		{"revoked active, none left: replace", 0, sched, []Version{{Kid: "a", State: Revoked}}, []Action{{Kind: CreateActive}}},
		{"leaving keys first, then activation", 48 * time.Hour, sched,
			[]Version{active("b", 24*time.Hour), next("c", 48*time.Hour), draining("a", 26*time.Hour), retired("z", 47*time.Hour)},
			[]Action{{Kind: Destroy, Kid: "z"}, {Kind: Retire, Kid: "a"}, {Kind: Activate, Kid: "c"}}}, // oldest first
		{"prepublish zero (dpop): next activates at the deadline", 24 * time.Hour, Schedule{Period: 24 * time.Hour, Drain: time.Hour},
			[]Version{active("a", 0)}, []Action{{Kind: CreateNext, ActivateAt: at(24 * time.Hour)}}},
		{"clock far past everything: one step of each, never two rotations", 1000 * time.Hour, sched,
			[]Version{active("a", 0), draining("z", time.Hour)},
			[]Action{{Kind: Retire, Kid: "z"}, {Kind: CreateNext, ActivateAt: at(1001 * time.Hour)}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := Plan(at(tc.now), tc.s, tc.vs)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Plan = %+v\nwant  %+v", got, tc.want)
			}
		})
	}
}

// Planning, applying the plan and planning again at the same instant gives
// nothing more to do: no deadline is acted on twice.
func TestPlanIsIdempotent(t *testing.T) {
	sched := Schedule{Period: 24 * time.Hour, Prepublish: time.Hour, Drain: 2 * time.Hour, Retain: 24 * time.Hour}
	vs := []Version{{Kid: "a", State: Active, ActivatedAt: t0, DeactivateAt: at(24 * time.Hour)}}
	now := t0
	step := 0
	for range 20000 { // 20000 minutes ≈ 14 days
		now = now.Add(time.Minute)
		for _, a := range Plan(now, sched, vs) {
			vs = apply(vs, a, now, sched, &step)
		}
		if again := Plan(now, sched, vs); len(again) != 0 {
			t.Fatalf("at %v a second plan: %+v", now.Sub(t0), again)
		}
		actives, published := 0, 0
		for _, v := range vs {
			if v.State == Active {
				actives++
			}
			if v.State.Published() {
				published++
			}
		}
		if actives != 1 || published > 3 {
			t.Fatalf("at %v: %d active, %d published: %+v", now.Sub(t0), actives, published, vs)
		}
	}
	rotations := 0
	for _, v := range vs {
		if !v.ActivatedAt.IsZero() {
			rotations++
		}
	}
	if rotations != 14 { // the first key and one a day
		t.Errorf("%d keys activated in 14 days, want 14", rotations)
	}
}

// apply does what the manager does for a, on plain values.
func apply(vs []Version, a Action, now time.Time, s Schedule, n *int) []Version {
	find := func(kid string) int {
		for i := range vs {
			if vs[i].Kid == kid {
				return i
			}
		}
		panic("no " + kid)
	}
	switch a.Kind {
	case CreateNext:
		*n++
		vs = append(vs, Version{Kid: string(rune('a' + *n)), State: Next, CreatedAt: now, ActivateAt: a.ActivateAt})
	case Activate:
		for i := range vs {
			if vs[i].State == Active {
				vs[i].State, vs[i].RetireAt = Draining, now.Add(s.Drain)
			}
		}
		i := find(a.Kid)
		vs[i].State, vs[i].ActivatedAt, vs[i].DeactivateAt = Active, now, now.Add(s.Period)
	case Retire:
		i := find(a.Kid)
		vs[i].State, vs[i].DestroyAt = Retired, now.Add(s.Retain)
	case Destroy:
		vs[find(a.Kid)].State = Destroyed
	}
	return vs
}

func TestNextDue(t *testing.T) {
	sched := Schedule{Period: 24 * time.Hour, Prepublish: time.Hour, Drain: 2 * time.Hour}
	vs := []Version{
		{Kid: "a", State: Active, DeactivateAt: at(24 * time.Hour)},
		{Kid: "z", State: Draining, RetireAt: at(2 * time.Hour)},
	}
	if got := NextDue(t0, sched, vs); !got.Equal(at(2 * time.Hour)) {
		t.Errorf("NextDue = %v", got.Sub(t0))
	}
	if got := NextDue(at(3*time.Hour), sched, vs); !got.Equal(at(23 * time.Hour)) {
		t.Errorf("NextDue after retire = %v", got.Sub(t0))
	}
	if got := NextDue(t0, Schedule{}, []Version{{State: Active}}); !got.IsZero() {
		t.Errorf("nothing scheduled: %v", got)
	}
	// Activated without a period, which the configuration has now.
	if got := NextDue(at(time.Hour), sched, []Version{{Kid: "a", State: Active, ActivatedAt: t0}}); !got.Equal(at(23 * time.Hour)) {
		t.Errorf("NextDue of a key activated before its key set had a period = %v, want 23h", got.Sub(t0))
	}
}
