package resume

import (
	"sync"
	"sync/atomic"
)

// Budget is a memory limit shared by many sessions' buffers (a gateway's
// --memory-budget). Buffers are charged chunk by chunk as they grow, not
// when a session opens, so that a session whose peer never acknowledges
// cannot grow past it: at the limit, writers into replay buffers wait
// (backpressure reaches the application or upstream socket, which is no
// longer read) until another session frees memory. Each session may still
// hold one chunk, so that no session starves because others hold the
// budget; the overshoot is bounded by one chunk per session.
//
// The zero limit counts without limiting. A nil *Budget does nothing.
type Budget struct {
	limit atomic.Int64 // SetLimit may change it while sessions run
	used  atomic.Int64

	// waiting is set (under mu) when a writer waits for memory, so that
	// releases skip the lock when nobody does.
	waiting atomic.Bool
	mu      sync.Mutex
	freed   chan struct{} // closed when memory is released
}

// NewBudget returns a Budget of limit bytes (0: no limit, only counting).
func NewBudget(limit int64) *Budget {
	b := &Budget{}
	b.limit.Store(max(limit, 0))
	return b
}

// SetLimit changes the limit (0: none). A lower limit than what is in use
// takes no memory back: writers wait until enough is released. A higher
// one wakes writers waiting for memory.
func (b *Budget) SetLimit(limit int64) {
	if b == nil {
		return
	}
	b.limit.Store(max(limit, 0))
	b.mu.Lock()
	if b.freed != nil {
		close(b.freed)
		b.freed = nil
	}
	b.waiting.Store(false)
	b.mu.Unlock()
}

// InUse is the bytes charged now.
func (b *Budget) InUse() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}

// Limit is the configured limit (0: none).
func (b *Budget) Limit() int64 {
	if b == nil {
		return 0
	}
	return b.limit.Load()
}

// Exhausted reports whether the limit is reached.
func (b *Budget) Exhausted() bool {
	if b == nil {
		return false
	}
	limit := b.limit.Load()
	return limit > 0 && b.used.Load() >= limit
}

func (b *Budget) charge(n int64) {
	if b == nil {
		return
	}
	b.used.Add(n)
	if n < 0 && b.waiting.Load() {
		b.mu.Lock()
		if b.freed != nil {
			close(b.freed)
			b.freed = nil
		}
		b.waiting.Store(false)
		b.mu.Unlock()
	}
}

// full returns nil if there is room, else a channel closed when memory is
// next released.
func (b *Budget) full() chan struct{} {
	if !b.Exhausted() {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.waiting.Store(true)
	// Checked again after announcing the wait: a release between the first
	// check and the Store would otherwise go unnoticed.
	if limit := b.limit.Load(); limit == 0 || b.used.Load() < limit {
		return nil
	}
	if b.freed == nil {
		b.freed = make(chan struct{})
	}
	return b.freed
}
