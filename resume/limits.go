package resume

import (
	"errors"
	"fmt"

	"golang.org/x/time/rate"
)

// Limits are the gateway's admission and resource limits that may change
// while it runs (a configuration reload): they apply to what comes next,
// never to what a live session already holds.
type Limits struct {
	MaxSessions             int
	MemoryBudget            int64
	MaxUnconfirmed          int
	MaxUnconfirmedPerSource int
	MaxPendingLinks         int
	MaxPendingPerSource     int
	FailureRate             rate.Limit
	FailureBurst            int
}

// Validate reports the first limit that cannot work.
func (l Limits) Validate() error {
	switch {
	case l.MaxSessions < 0 || l.MemoryBudget < 0:
		return errors.New("resume: MaxSessions and MemoryBudget must not be negative")
	case l.MaxPendingLinks <= 0 || l.MaxPendingPerSource <= 0:
		return errors.New("resume: MaxPendingLinks and MaxPendingPerSource must be positive")
	case l.MaxUnconfirmed <= 0 || l.MaxUnconfirmedPerSource <= 0:
		return errors.New("resume: MaxUnconfirmed and MaxUnconfirmedPerSource must be positive")
	case l.FailureRate <= 0 || l.FailureBurst <= 0:
		return errors.New("resume: FailureRate and FailureBurst must be positive")
	}
	return nil
}

// Limits returns the limits in force.
func (srv *Server) Limits() Limits {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.limitsLocked()
}

func (srv *Server) limitsLocked() Limits {
	c := &srv.cfg
	return Limits{
		MaxSessions: c.MaxSessions, MemoryBudget: srv.budget.Limit(),
		MaxUnconfirmed: c.MaxUnconfirmed, MaxUnconfirmedPerSource: c.MaxUnconfirmedPerSource,
		MaxPendingLinks: c.MaxPendingLinks, MaxPendingPerSource: c.MaxPendingPerSource,
		FailureRate: c.FailureRate, FailureBurst: c.FailureBurst,
	}
}

// SetLimits changes the limits for what comes next: a lower MaxSessions
// refuses new sessions until enough have ended and ends none; a lower
// memory budget makes writers wait until enough is released; failure
// throttles already filled keep their tokens at the new rate. An invalid
// set is refused and the old one kept. (The number of handshakes at once
// is fixed at NewServer.)
func (srv *Server) SetLimits(l Limits) error {
	if err := l.Validate(); err != nil {
		return fmt.Errorf("%w (limits unchanged)", err)
	}
	srv.mu.Lock()
	c := &srv.cfg
	c.MaxSessions, c.MemoryBudget = l.MaxSessions, l.MemoryBudget
	c.MaxUnconfirmed, c.MaxUnconfirmedPerSource = l.MaxUnconfirmed, l.MaxUnconfirmedPerSource
	c.MaxPendingLinks, c.MaxPendingPerSource = l.MaxPendingLinks, l.MaxPendingPerSource
	c.FailureRate, c.FailureBurst = l.FailureRate, l.FailureBurst
	for _, lim := range srv.sources {
		lim.SetLimit(l.FailureRate)
		lim.SetBurst(l.FailureBurst)
	}
	srv.mu.Unlock()
	srv.pending.setLimits(l.MaxPendingLinks, l.MaxPendingPerSource)
	srv.budget.SetLimit(l.MemoryBudget)
	return nil
}
