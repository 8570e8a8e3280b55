package proxy

import (
	"fmt"
	"net"
	"time"

	"github.com/lifeline-proxy/lifeline/resume"
)

// undeliveredGrace is how long the gateway's freeze waits for a session
// that the session server had handed out (Accept) just before it froze
// to be tracked by the gateway. A frozen session that is still not
// tracked after it was never handed out: it goes over as such, and the
// new process's server hands it out when its client confirms it.
const undeliveredGrace = 500 * time.Millisecond

// handItem is one session held for a hand-over.
type handItem struct {
	x      *tracked     // nil: a gateway session the gateway never took
	conn   *resume.Conn // the session
	stop   stoppedSplice
	halted bool // its splice stopped (stop is set)
}

// Handover is the old process's side of a hand-over: sessions frozen,
// their splices stopped, held until Commit or Rollback. It implements
// HandoverBatch.
type Handover struct {
	c     *core
	items []*handItem
	srv   *resume.Server // gateway: thawed on Rollback
	done  bool
}

// FreezeForHandover freezes every session of the gateway and stops its
// splices, within wait. The gateway's listeners must be paused first
// (PausableListener), so that no link starts a handshake meanwhile;
// links in their handshake are closed (their clients retry). A session
// whose upstream connect is in progress is waited for (it is bounded by
// its route's connect timeout); one that does not stop in time fails the
// freeze, which then thaws everything.
func (g *Gateway) FreezeForHandover(wait time.Duration) (*Handover, error) {
	deadline := time.Now().Add(wait)
	h := &Handover{c: &g.core, srv: g.srv}
	conns := g.srv.Freeze()
	byID := g.trackedByID()
	var missing []*handItem
	for _, conn := range conns {
		it := &handItem{conn: conn, x: byID[conn.SessionID()]}
		h.items = append(h.items, it)
		if it.x == nil {
			missing = append(missing, it)
		}
	}
	// A session handed out just before the freeze is taken by the
	// gateway in a moment; one grace for all of them, so that a burst of
	// unconfirmed sessions (never handed out) does not add up.
	for grace := time.Now().Add(undeliveredGrace); len(missing) > 0 && time.Now().Before(grace); {
		time.Sleep(5 * time.Millisecond)
		byID = g.trackedByID()
		still := missing[:0]
		for _, it := range missing {
			if it.x = byID[it.conn.SessionID()]; it.x == nil && !isDone(it.conn) {
				still = append(still, it)
			}
		}
		missing = still
	}
	if err := h.waitStopped(deadline); err != nil {
		h.Rollback()
		return nil, err
	}
	return h, nil
}

// FreezeForHandover freezes every session of the client and stops its
// splices, within wait. The application listeners must be paused first
// (PausableListener). A session being opened (its HELLO in flight, or
// its first link being dialled) is waited for; one still opening at wait
// fails the freeze, which then thaws everything.
func (c *Client) FreezeForHandover(wait time.Duration) (*Handover, error) {
	deadline := time.Now().Add(wait)
	for c.handling.Load() > 0 {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%d sessions still opening after %v (a gateway that cannot be reached?): try again", c.handling.Load(), wait)
		}
		time.Sleep(5 * time.Millisecond)
	}
	h := &Handover{c: &c.core}
	for _, x := range c.tracker.list() {
		if err := x.conn.Freeze(); err != nil {
			continue // ended, or closing: its splice finishes here
		}
		h.items = append(h.items, &handItem{x: x, conn: x.conn})
	}
	if err := h.waitStopped(deadline); err != nil {
		h.Rollback()
		return nil, err
	}
	return h, nil
}

func isDone(conn *resume.Conn) bool {
	select {
	case <-conn.Done():
		return true
	default:
		return false
	}
}

// waitStopped waits for the splice of every tracked item to stop; items
// whose session ended meanwhile are dropped.
func (h *Handover) waitStopped(deadline time.Time) error {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for _, it := range h.items {
		if it.x != nil {
			it.x.ctl.handover()
		}
	}
	kept := h.items[:0]
	var err error
	for _, it := range h.items {
		if it.x == nil || err != nil {
			if isDone(it.conn) {
				continue
			}
			kept = append(kept, it)
			continue
		}
		select {
		case it.stop = <-it.x.stop:
			it.halted = true
			kept = append(kept, it)
		case <-it.x.done:
		case <-t.C:
			err = fmt.Errorf("session %s did not stop within the hand-over's wait", it.conn.SessionID())
			kept = append(kept, it)
		}
	}
	h.items = kept
	return err
}

// Len is the number of sessions held.
func (h *Handover) Len() int { return len(h.items) }

// Records snapshots every session held.
func (h *Handover) Records() ([]*HandoverRecord, error) {
	var recs []*HandoverRecord
	fail := func(err error) ([]*HandoverRecord, error) {
		for _, r := range recs {
			closeFile(r.File)
		}
		return nil, err
	}
	for _, it := range h.items {
		snap, err := it.conn.Snapshot()
		if err != nil {
			return fail(fmt.Errorf("session %s: snapshot: %w", it.conn.SessionID(), err))
		}
		r := &HandoverRecord{Kind: RecordUnspliced, Route: it.conn.Route(), Snapshot: snap, Started: time.Now()}
		if it.x != nil {
			r.App, r.Started, r.Listen = it.x.app, it.x.started, it.x.listen
		}
		if it.halted {
			f, err := it.stop.tcp.File()
			if err != nil {
				return fail(fmt.Errorf("session %s: socket: %w", it.conn.SessionID(), err))
			}
			r.Kind, r.File, r.UpDone, r.DownDone = RecordSession, f, it.stop.from.UpDone, it.stop.from.DownDone
		}
		recs = append(recs, r)
	}
	return recs, nil
}

// Commit forgets every session held: the new process has them. Their
// sockets are closed here only (the new process holds its own copies),
// so neither the TCP peer nor the session's peer sees anything.
func (h *Handover) Commit() {
	if h.done {
		return
	}
	h.done = true
	for _, it := range h.items {
		it.conn.Release()
		if it.halted {
			it.stop.tcp.Close()
		}
		if it.x != nil {
			h.c.untrack(it.x)
			h.c.metrics.SessionEnded(h.c.side, it.x.route, causeHandover)
			log := h.c.log.With("side", h.c.side, "session", it.conn.SessionID().String(), "route", it.x.route)
			if it.halted {
				log = it.stop.log
			}
			log.Info("session handed over", "duration", time.Since(it.x.started).Round(time.Millisecond))
		}
	}
}

// Rollback thaws every session held and restarts its splice: the
// hand-over failed and this process goes on serving them.
func (h *Handover) Rollback() {
	if h.done {
		return
	}
	h.done = true
	if h.srv != nil {
		h.srv.Thaw()
	}
	for _, it := range h.items {
		it.conn.Thaw()
		switch {
		case it.halted:
			it.stop.tcp.SetDeadline(time.Time{})
			h.c.goSession(func() { h.c.runSplice(it.stop.tcp, it.x, it.stop.log, it.stop.from) })
		case it.x != nil:
			// Its splice had not stopped when the freeze gave up: if it
			// does stop now, start it again.
			x := it.x
			h.c.goSession(func() {
				select {
				case st := <-x.stop:
					st.tcp.SetDeadline(time.Time{})
					h.c.runSplice(st.tcp, x, st.log, st.from)
				case <-x.done:
				}
			})
		}
	}
}

// Taken is the new process's side: sessions restored from a hand-over,
// frozen until Start. It implements HandoverTaken.
type Taken struct {
	c     *core
	items []takenItem
	start func(takenItem)
}

type takenItem struct {
	rec  *HandoverRecord
	conn *resume.Conn // nil for RecordApp
	tcp  *net.TCPConn // nil for RecordUnspliced
	cr   ClientRoute
	cfg  *resume.Config
}

// fileTCP turns a received socket into a *net.TCPConn (the file is
// closed: the conn holds its own descriptor).
func fileTCP(r *HandoverRecord) (*net.TCPConn, error) {
	if r.File == nil {
		return nil, nil
	}
	defer func() { r.File.Close(); r.File = nil }()
	c, err := net.FileConn(r.File)
	if err != nil {
		return nil, err
	}
	tcp, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("handed-over socket is a %T, not TCP", c)
	}
	return tcp, nil
}

// RestoreHandover rebuilds the sessions of a hand-over, frozen, for the
// gateway: every record's route must exist here. On error nothing is
// kept (and the old process keeps the sessions).
func (g *Gateway) RestoreHandover(recs []*HandoverRecord) (*Taken, error) {
	t := &Taken{c: &g.core}
	t.start = func(it takenItem) {
		if it.tcp == nil {
			return // the server delivers it once its client confirms it
		}
		route, _ := g.route(it.rec.Route)
		x := g.track(it.conn, route.Name, it.rec.App, it.rec.Started)
		log := g.log.With("side", "gateway", "session", it.conn.SessionID().String(), "route", route.Name)
		log.Info("session taken over", "upstream", it.rec.App, "upstream_local", it.tcp.LocalAddr())
		g.metrics.SessionStarted(g.side, x.route)
		g.goSession(func() { g.runSplice(it.tcp, x, log, spliceFrom{it.rec.UpDone, it.rec.DownDone}) })
	}
	for _, r := range recs {
		if r.Kind == RecordApp {
			t.Release()
			closeRecs(recs)
			return nil, fmt.Errorf("handover: a client's application record given to a gateway")
		}
		if _, ok := g.route(r.Route); !ok {
			t.Release()
			closeRecs(recs)
			return nil, fmt.Errorf("handover: route %q is not in this gateway's config", r.Route)
		}
		conn, err := g.srv.Restore(r.Snapshot)
		if err != nil {
			t.Release()
			closeRecs(recs)
			return nil, fmt.Errorf("handover: %w", err)
		}
		tcp, err := fileTCP(r)
		if err != nil {
			conn.Release()
			t.Release()
			closeRecs(recs)
			return nil, err
		}
		t.items = append(t.items, takenItem{rec: r, conn: conn, tcp: tcp})
	}
	return t, nil
}

// RestoreHandover rebuilds the sessions of a hand-over, frozen, for the
// client: a record names its application listener, which must be served
// here already (Serve called, paused: see PausableListener) with the
// route the record names.
func (c *Client) RestoreHandover(recs []*HandoverRecord) (*Taken, error) {
	t := &Taken{c: &c.core}
	t.start = func(it takenItem) {
		if it.conn == nil {
			c.handling.Add(1)
			c.goSession(func() { c.handle(it.tcp, it.cr, it.cfg, it.rec.Listen) })
			return
		}
		x := c.track(it.conn, it.cr.Route, it.rec.App, it.rec.Started)
		x.listen = it.rec.Listen
		log := c.log.With("side", "client", "session", it.conn.SessionID().String(), "route", it.cr.Route)
		log.Info("session taken over", "app", it.rec.App, "gateway", it.cr.Gateway)
		c.metrics.SessionStarted(c.side, x.route)
		c.goSession(func() { c.runSplice(it.tcp, x, log, spliceFrom{it.rec.UpDone, it.rec.DownDone}) })
	}
	for _, r := range recs {
		fail := func(err error) (*Taken, error) {
			t.Release()
			closeRecs(recs)
			return nil, err
		}
		sr := c.servedAt(r.Listen)
		if sr == nil {
			return fail(fmt.Errorf("handover: listener %s (route %q) is not in this client's config", r.Listen, r.Route))
		}
		if sr.r.Route != r.Route && r.Kind == RecordSession {
			return fail(fmt.Errorf("handover: listener %s serves route %q here, the session is on %q", r.Listen, sr.r.Route, r.Route))
		}
		if r.Kind == RecordUnspliced {
			return fail(fmt.Errorf("handover: a gateway's record given to a client"))
		}
		cr, cfg := sr.r, sr.cfg
		it := takenItem{rec: r, cr: cr, cfg: cfg}
		if r.Kind == RecordSession {
			conn, err := resume.Restore(r.Snapshot, c.linkDial(cr), cfg)
			if err != nil {
				return fail(fmt.Errorf("handover: %w", err))
			}
			it.conn = conn
		}
		tcp, err := fileTCP(r)
		if err != nil {
			if it.conn != nil {
				it.conn.Release()
			}
			return fail(err)
		}
		it.tcp = tcp
		t.items = append(t.items, it)
	}
	return t, nil
}

// Start thaws the sessions and splices them: the hand-over committed.
func (t *Taken) Start() {
	for _, it := range t.items {
		if it.conn != nil {
			it.conn.Thaw()
		}
		t.start(it)
	}
	t.items = nil
}

// Release forgets the sessions without a word to anyone and closes this
// process's copies of their sockets (the old process keeps its own).
func (t *Taken) Release() {
	for _, it := range t.items {
		if it.conn != nil {
			it.conn.Release()
		}
		if it.tcp != nil {
			it.tcp.Close()
		}
	}
	t.items = nil
}

// Len is the number of sessions restored.
func (t *Taken) Len() int { return len(t.items) }

// list returns the tracked sessions.
func (t *Tracker) list() []*tracked {
	t.mu.Lock()
	defer t.mu.Unlock()
	xs := make([]*tracked, 0, len(t.live))
	for x := range t.live {
		xs = append(xs, x)
	}
	return xs
}

// servedAt is the route of the listener at addr, waiting a little for its
// Serve to register it (Serve runs in its own goroutine).
func (c *Client) servedAt(addr string) *servedRoute {
	for deadline := time.Now().Add(time.Second); ; time.Sleep(5 * time.Millisecond) {
		c.mu.Lock()
		p := c.served[addr]
		c.mu.Unlock()
		if p != nil {
			return p.Load()
		}
		if time.Now().After(deadline) {
			return nil
		}
	}
}

// trackedByID indexes the tracked sessions by id.
func (c *core) trackedByID() map[resume.SessionID]*tracked {
	xs := c.tracker.list()
	m := make(map[resume.SessionID]*tracked, len(xs))
	for _, x := range xs {
		m[x.conn.SessionID()] = x
	}
	return m
}
