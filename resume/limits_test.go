package resume

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestSetLimitsAppliesToNewSessions: a reload's lower MaxSessions refuses
// the next HELLO with LIMIT and ends nobody; a higher one admits again;
// an invalid set is refused and changes nothing.
func TestSetLimitsAppliesToNewSessions(t *testing.T) {
	cfg := testConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	defer e.stop()
	c1, s1 := e.pair(cfg)
	defer c1.Close()
	defer s1.Close()

	lim := e.srv.Limits()
	lim.MaxSessions = 1
	if err := e.srv.SetLimits(lim); err != nil {
		t.Fatal(err)
	}
	if _, err := Dial(context.Background(), e.dial, "r", cfg); !errors.Is(err, ErrLimit) {
		t.Fatalf("HELLO past the lowered cap: %v, want LIMIT", err)
	}
	if st := c1.State(); st != StateActive {
		t.Fatalf("the live session is %v after the cap was lowered", st)
	}
	bad := lim
	bad.MaxUnconfirmed = 0
	if err := e.srv.SetLimits(bad); err == nil {
		t.Fatal("an invalid set of limits was taken")
	}
	if got := e.srv.Limits(); got != lim {
		t.Fatalf("limits after a refused set: %+v, want %+v", got, lim)
	}
	lim.MaxSessions = 2
	if err := e.srv.SetLimits(lim); err != nil {
		t.Fatal(err)
	}
	c2, s2 := e.pair(cfg)
	c2.Close()
	s2.Close()
}

// TestRaisedBudgetWakesWriters: a writer waiting at an exhausted memory
// budget goes on when a reload raises the budget.
func TestRaisedBudgetWakesWriters(t *testing.T) {
	b := NewBudget(chunkSize)
	b.charge(chunkSize)
	full := b.full()
	if full == nil {
		t.Fatal("budget not exhausted")
	}
	b.SetLimit(4 * chunkSize)
	select {
	case <-full:
	case <-time.After(5 * time.Second):
		t.Fatal("a raised budget did not wake the waiting writer")
	}
	if b.full() != nil || b.Exhausted() {
		t.Fatal("still exhausted after the raise")
	}
	b.SetLimit(chunkSize / 2)
	if !b.Exhausted() {
		t.Fatal("a lowered budget below what is in use is not exhausted")
	}
}
