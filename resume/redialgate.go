package resume

import (
	"container/list"
	"sync"
)

// A RedialGate caps how many reconnect attempts of the sessions that share
// it (through Config.Redials) dial and hand-shake at the same time. When a
// gateway or the path to it fails, every session of a client sidecar
// loses its link in the same instant and its first attempt is due at
// once: thousands of simultaneous dials and TLS handshakes that the
// returning gateway must absorb (its MaxHandshakes would refuse most of
// them) and that, in the sidecar, each take a goroutine with its stack and
// a link's buffers for the attempt's life. Attempts beyond the cap wait
// their turn in order of arrival, as a queued callback: no goroutine. An
// attempt that waits longer than its own backoff loses nothing: the
// strategy's next delay counts from the end of the attempt, as without a
// gate.
type RedialGate struct {
	mu      sync.Mutex
	limit   int
	running int
	// queue holds the waiting attempts (func()) in order of arrival; a
	// cancelled one is taken out where it is.
	queue list.List
}

// DefaultRedialGateLimit is the attempts in flight a client sidecar allows
// by default: far more than a recovering gateway admits at once by default
// (MaxHandshakes 256 per gateway process) would not get through faster.
const DefaultRedialGateLimit = 128

// NewRedialGate returns a gate for limit attempts at once (at least 1).
func NewRedialGate(limit int) *RedialGate { return &RedialGate{limit: max(limit, 1)} }

// redialTicket is one attempt waiting at the gate.
type redialTicket = list.Element

// enter takes a place for an attempt that runs in the caller's goroutine
// (true), or queues run to be started in a new goroutine once one is free
// (false, and the ticket that cancel takes).
func (g *RedialGate) enter(run func()) (bool, *redialTicket) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.running < g.limit && g.queue.Len() == 0 {
		g.running++
		return true, nil
	}
	return false, g.queue.PushBack(run)
}

// leave gives an attempt's place back, to the first waiting attempt if
// there is one.
func (g *RedialGate) leave() {
	g.mu.Lock()
	t := g.queue.Front()
	if t == nil {
		g.running--
		g.mu.Unlock()
		return
	}
	run := g.queue.Remove(t).(func())
	t.Value = nil // cancel must see it gone
	g.mu.Unlock()
	go run() // the place passes to it
}

// cancel takes t out of the queue; false if it already left it (it runs,
// or has run).
func (g *RedialGate) cancel(t *redialTicket) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	// A ticket's Value is cleared as it leaves the queue (here or in
	// leave): list.Remove of an element already out does nothing and
	// would not say so.
	if t.Value == nil {
		return false
	}
	g.queue.Remove(t)
	t.Value = nil
	return true
}

// Waiting is how many attempts wait for a place (for metrics and tests).
func (g *RedialGate) Waiting() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.queue.Len()
}

// Running is how many attempts hold a place.
func (g *RedialGate) Running() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.running
}
