package proxy

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/lifeline-proxy/lifeline/resume"
)

// core is what a Client and a Gateway share, embedded in both: the log,
// the metrics, the live sessions, and the splices that join each session
// to its TCP connection (the application's on a client, the upstream's on
// a gateway).
type core struct {
	side string // "client" or "gateway", in logs and metrics
	// upName and downName name the byte counts of the end log line from
	// this side's point of view: up is what the TCP connection sent into
	// the session, down what it got from it.
	upName, downName string

	log     *slog.Logger
	metrics Metrics
	tracker *Tracker

	abort       context.Context // cancelled to force-close splices
	abortCancel context.CancelFunc
	sessions    sync.WaitGroup // one per session being opened or spliced
}

// init sets c up; log and m may be nil (discard, NopMetrics).
func (c *core) init(side, upName, downName string, log *slog.Logger, m Metrics) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = NopMetrics{}
	}
	c.side, c.upName, c.downName = side, upName, downName
	c.log, c.metrics, c.tracker = log, m, newTracker()
	c.abort, c.abortCancel = context.WithCancel(context.Background())
}

// Tracker is the set of live sessions.
func (c *core) Tracker() *Tracker { return c.tracker }

// Sessions lists live sessions for the status endpoint.
func (c *core) Sessions() []SessionInfo { return c.tracker.Sessions(c.side) }

// goSession runs f, the life of one session, counted by c.sessions.
func (c *core) goSession(f func()) {
	c.sessions.Add(1)
	go func() {
		defer c.sessions.Done()
		f()
	}()
}

// splice joins x's session and its TCP connection conn until both
// directions have ended (see join), tracking the session meanwhile; then
// it counts the end in the metrics and logs it with the bytes each way.
func (c *core) splice(conn *net.TCPConn, x *tracked, log *slog.Logger) {
	c.metrics.SessionStarted(c.side, x.route)
	c.tracker.add(x)
	res := join(conn, x.conn, c.abort)
	st := x.conn.Stats()
	c.tracker.remove(x)
	c.metrics.SessionEnded(c.side, x.route, res.Cause)
	args := []any{"cause", res.Cause, c.upName, res.Up, c.downName, res.Down,
		"duration", time.Since(x.started).Round(time.Millisecond), "resumes", st.Resumes, "replayed", st.BytesReplayed}
	if res.Err != nil {
		args = append(args, "err", res.Err)
	}
	log.Info("session end", args...)
}

// tracked is a live session as the Tracker sees it.
type tracked struct {
	conn    *resume.Conn
	route   string
	app     string // application address (client) or upstream (gateway)
	started time.Time
}
