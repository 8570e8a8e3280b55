package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
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

	// abort is cancelled, with an *endCause, to force-close every splice
	// (Close, or a drain that ran out of time); each session's own context
	// derives from it.
	abort       context.Context
	abortCancel context.CancelCauseFunc
	sessions    sync.WaitGroup // one per session being opened or spliced
	// handling counts a client's accepted application connections whose
	// session is not tracked yet: a hand-over waits for them.
	handling atomic.Int64
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
	c.abort, c.abortCancel = context.WithCancelCause(context.Background())
}

// hooks reports resumes and first resumed bytes to the metrics.
func (c *core) hooks() *resume.Hooks {
	return &resume.Hooks{
		Resumed:   func(outage time.Duration) { c.metrics.Resumed(c.side, outage) },
		FirstByte: func(d time.Duration) { c.metrics.FirstResumedByte(c.side, d) },
	}
}

// withHooks returns a copy of cfg that reports to the metrics.
func (c *core) withHooks(cfg *resume.Config) *resume.Config {
	cp := *cfg
	cp.Hooks = c.hooks()
	return &cp
}

// Tracker is the set of live sessions.
func (c *core) Tracker() *Tracker { return c.tracker }

// goSession runs f, the life of one session, counted by c.sessions.
func (c *core) goSession(f func()) {
	c.sessions.Add(1)
	go func() {
		defer c.sessions.Done()
		f()
	}()
}

// track starts tracking conn: it is listed and counted from now on, and
// End can end it. The caller must call c.untrack or c.splice with it.
func (c *core) track(conn *resume.Conn, route, app string, started time.Time) *tracked {
	ctx, cancel := context.WithCancelCause(c.abort)
	x := &tracked{conn: conn, route: route, app: app, started: started, ctx: ctx, end: cancel, done: make(chan struct{}),
		stop: make(chan stoppedSplice, 1)}
	c.tracker.add(x)
	return x
}

// untrack ends tracking x (its session is over).
func (c *core) untrack(x *tracked) {
	c.tracker.remove(x)
	x.end(nil)
	close(x.done)
}

// splice joins x's session and its TCP connection conn until both
// directions have ended (see join); then it counts the end in the metrics
// and logs it with the bytes each way.
//
// The splice starts in a goroutine of its own, which ends once the splice
// is started (join keeps none while the session is idle).
func (c *core) splice(conn *net.TCPConn, x *tracked, log *slog.Logger) {
	c.metrics.SessionStarted(c.side, x.route)
	c.goSession(func() { c.runSplice(conn, x, log, spliceFrom{}) })
}

// runSplice is splice from a given point: a session thawed after a
// hand-over that failed, or taken over from another process, may have
// one direction ended already. A splice stopped by a hand-over leaves
// the session tracked and its socket open, and hands both to the
// hand-over on x.stop.
//
// It returns once the splice is started: no goroutine of ours waits for
// it (join), and c.sessions counts it until it has ended.
func (c *core) runSplice(conn *net.TCPConn, x *tracked, log *slog.Logger, from spliceFrom) {
	c.sessions.Add(1)
	join(conn, x.conn, x.ctx, from, &x.ctl, func(res spliceResult) {
		defer c.sessions.Done()
		c.spliceEnded(conn, x, log, res)
	})
}

// spliceEnded is what follows a splice's end: the session is counted,
// untracked and logged, or handed to a hand-over that stopped it.
func (c *core) spliceEnded(conn *net.TCPConn, x *tracked, log *slog.Logger, res spliceResult) {
	if res.Cause == causeHandover {
		x.stop <- stoppedSplice{tcp: conn, from: spliceFrom{res.UpDone, res.DownDone}, log: log}
		return
	}
	st := x.conn.Stats()
	// Counted before the session leaves the list, so that whoever sees it
	// gone (End, the admin API, a test) sees it counted too.
	c.metrics.SessionEnded(c.side, x.route, res.Cause)
	c.untrack(x)
	args := []any{"cause", res.Cause, c.upName, res.Up, c.downName, res.Down,
		"duration", time.Since(x.started).Round(time.Millisecond), "resumes", st.Resumes, "replayed", st.BytesReplayed}
	if res.Err != nil {
		args = append(args, "err", res.Err)
	}
	log.Info("session end", args...)
}

// endWait bounds how long End waits for a splice to finish after it
// aborted it: the TCP connection is reset at once, but a client's RESET
// to a gateway it has no link to may take a handshake timeout.
const endWait = 2 * time.Second

// end ends the tracked session id now: its TCP connection gets a reset,
// the peer a RESET (a parked session's at its next resume, on a gateway).
// It returns the session as it was ended, after its splice finished or
// endWait passed.
func (c *core) end(id, reason string) (SessionInfo, error) {
	x := c.tracker.find(id)
	if x == nil {
		return SessionInfo{}, fmt.Errorf("%w: %s", ErrNoSession, id)
	}
	x.end(adminEnd(reason))
	t := time.NewTimer(endWait)
	defer t.Stop()
	select {
	case <-x.done:
	case <-t.C:
	}
	return c.tracker.info(c.side, x.conn, x, time.Now()), nil
}

// ErrNoSession is returned for an id that is not live here.
var ErrNoSession = errors.New("no such session")

// tracked is a live session as the Tracker sees it.
type tracked struct {
	conn    *resume.Conn
	route   string
	app     string // application address (client) or upstream (gateway)
	started time.Time
	// ctx is the session's: cancelled with an *endCause to abort its
	// splice (End, or the proxy's abort), and when it is over.
	ctx  context.Context
	end  context.CancelCauseFunc
	done chan struct{} // closed when the session is no longer tracked
	// stop gets the splice's socket when a hand-over stopped it; ctl
	// stops the splice.
	stop chan stoppedSplice
	ctl  spliceCtl
	// listen is a client session's application listener (it names the
	// route when the session is handed over).
	listen string
}

// stoppedSplice is a splice a hand-over stopped: where it was.
type stoppedSplice struct {
	tcp  *net.TCPConn
	from spliceFrom
	log  *slog.Logger
}

// endCause is why a session is ended from outside its splice: the code
// and reason its peer gets in RESET, and the cause in logs and metrics.
type endCause struct {
	code   resume.Code
	reason string
	cause  string
}

func (e *endCause) Error() string { return e.reason }

// shutdownEnd aborts the splices left when a drain runs out of time or
// the proxy is closed.
var shutdownEnd = &endCause{code: frame.CodeShuttingDown, reason: "proxy shutting down", cause: "shutting_down"}

// adminEnd is an operator's DELETE /sessions/{id}. The peer gets
// APP_RESET: its application is reset, as by an application's own RST,
// and a gateway answers a later RESUME of the session with it.
func adminEnd(reason string) *endCause {
	return &endCause{code: frame.CodeAppReset, reason: reason, cause: "admin"}
}
