package resume

import (
	"container/list"
	"log/slog"
	"net"
	"sync"
	"time"
)

// sourceOf is the address a per-source limit counts against: the IP,
// without the port.
func sourceOf(a net.Addr) string {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.IP.String()
	case *net.UDPAddr:
		return a.IP.String()
	case nil:
		return ""
	}
	if h, _, err := net.SplitHostPort(a.String()); err == nil {
		return h
	}
	return a.String()
}

// pendingLinks tracks links that have not sent their first handshake
// frame. They cost a goroutine, a socket and a read buffer each, and a
// peer can open them for free, so both the total and each source's count
// are capped; past a cap the oldest is closed (its read fails and its
// goroutine ends). Evicting the oldest rather than refusing the newest
// keeps a silent flood from locking out a client that speaks at once.
type pendingLinks struct {
	mu        sync.Mutex
	max       int
	perSource int
	all       list.List // of *pendingLink, oldest first
	bySource  map[string]*list.List
}

type pendingLink struct {
	conn   net.Conn
	source string
	inAll  *list.Element
	inSrc  *list.Element
}

// setLimits changes the caps for links that come next.
func (p *pendingLinks) setLimits(max, perSource int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.max, p.perSource = max, perSource
}

func (p *pendingLinks) init(max, perSource int) {
	p.max, p.perSource = max, perSource
	p.bySource = make(map[string]*list.List)
}

// add registers c and returns it with the links it displaced (to close,
// and to count as refusals, without the lock).
func (p *pendingLinks) add(c net.Conn, source string) (*pendingLink, []net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var evicted []net.Conn
	src := p.bySource[source]
	if src == nil {
		src = new(list.List)
		p.bySource[source] = src
	}
	if src.Len() >= p.perSource {
		evicted = append(evicted, p.removeLocked(src.Front().Value.(*pendingLink)))
	}
	if p.all.Len() >= p.max {
		evicted = append(evicted, p.removeLocked(p.all.Front().Value.(*pendingLink)))
	}
	pl := &pendingLink{conn: c, source: source}
	if src = p.bySource[source]; src == nil { // emptied by an eviction
		src = new(list.List)
		p.bySource[source] = src
	}
	pl.inAll = p.all.PushBack(pl)
	pl.inSrc = src.PushBack(pl)
	return pl, evicted
}

// done unregisters a link that spoke (or failed), and reports whether it
// was still registered (false: it was evicted).
func (p *pendingLinks) done(pl *pendingLink) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pl.inAll == nil {
		return false
	}
	p.removeLocked(pl)
	return true
}

func (p *pendingLinks) removeLocked(pl *pendingLink) net.Conn {
	p.all.Remove(pl.inAll)
	src := p.bySource[pl.source]
	src.Remove(pl.inSrc)
	if src.Len() == 0 {
		delete(p.bySource, pl.source)
	}
	pl.inAll, pl.inSrc = nil, nil
	return pl.conn
}

func (p *pendingLinks) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.all.Len()
}

// refusalLog rate-limits refusal log lines: a flood must not turn into a
// flood of log lines. The first refusal of each kind is logged at once,
// then at most one line per kind per second, saying how many were not.
type refusalLog struct {
	log  *slog.Logger
	mu   sync.Mutex
	last map[string]*refusalCount
}

type refusalCount struct {
	at         time.Time
	suppressed int
}

const refusalLogEvery = time.Second

func (r *refusalLog) warn(kind, msg string, args ...any) {
	r.mu.Lock()
	if r.last == nil {
		r.last = make(map[string]*refusalCount)
	}
	c := r.last[kind]
	if c == nil {
		c = &refusalCount{}
		r.last[kind] = c
	}
	now := time.Now()
	if !c.at.IsZero() && now.Sub(c.at) < refusalLogEvery {
		c.suppressed++
		r.mu.Unlock()
		return
	}
	c.at = now
	n := c.suppressed
	c.suppressed = 0
	r.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	r.log.Warn(msg, append([]any{"refusal", kind}, args...)...)
}
