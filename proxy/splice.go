package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/resume"
)

// session is the part of *resume.Conn that join uses.
type session interface {
	net.Conn
	io.ReaderFrom
	io.WriterTo
	CloseWrite() error
	Reset(code resume.Code, reason string) error
	Frozen() bool
}

// deliverer is a session that writes what it receives to a socket
// without a goroutine of ours waiting (resume.Conn.DeliverTo).
type deliverer interface {
	DeliverTo(w io.Writer, done func(n int64, err error))
}

// countingReader counts what it reads and keeps its source's error, to
// tell an application failure from a session failure after ReadFrom.
type countingReader struct {
	r   io.Reader
	tc  *net.TCPConn // r
	n   *atomic.Int64
	err error
}

// TCPConn and Consumed make it a resume.SocketSource: the session reads
// the socket around Read (no poll(2) before each read; bulk by splice).
func (c *countingReader) TCPConn() *net.TCPConn { return c.tc }

func (c *countingReader) Consumed(n int, err error) {
	c.n.Add(int64(n))
	if err != nil && err != io.EOF {
		c.err = err
	}
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	if err != nil && err != io.EOF {
		c.err = err
	}
	return n, err
}

// spliceResult says how a splice ended.
type spliceResult struct {
	Cause string // "closed", or a lower-case code name such as "app_reset", "buffer_lost"
	Err   error  // the abort error, nil for an orderly end
	Up    int64  // bytes from the application into the session
	Down  int64  // bytes from the session to the application
	// UpDone and DownDone say which directions had ended (a
	// hand-over's new process starts the splice from there).
	UpDone, DownDone bool
}

// join joins a TCP connection (an application's, or an upstream's) and a
// session until both directions have ended, then closes both and calls
// finish with how it ended. A FIN from either side becomes a FIN on the
// other after all data (half-close); an application RST becomes a session
// RESET with APP_RESET, and a session abort (any code) resets the
// application socket. abort, when cancelled, aborts the splice with the
// code and cause of its *endCause (SHUTTING_DOWN after a drain timeout,
// APP_RESET for an operator's end; SHUTTING_DOWN without one).
//
// An idle session's memory is mostly goroutine stacks, so join keeps none
// while idle: the application -> session direction is a resume.Feed,
// whose reads park in the shared poller while the socket is quiet; the
// session runs the other direction itself (resume.Conn.DeliverTo) in a
// goroutine that exists only while it has bytes to write; the abort is a
// context.AfterFunc, not a watcher; and finish runs in whichever
// goroutine ended the last direction. join returns once both directions
// are started. Its state is one splice value: closures over a dozen
// variables cost a heap object per variable, held for the session's life.
//
// A feed parked in the poller does not see its socket closed or its
// deadline set, so everything here that does either (fail, handover)
// unparks it first.
func join(app *net.TCPConn, sess session, abort context.Context, from spliceFrom, ctl *spliceCtl, finish func(spliceResult)) {
	sp := &splice{app: app, sess: sess, abort: abort, ctl: ctl, finish: finish,
		upEnded: from.UpDone, downEnd: from.DownDone, abortDone: make(chan struct{})}
	sp.src = countingReader{r: app, tc: app, n: &sp.up}
	if !sp.upEnded {
		sp.pending.Add(1)
		if f, ok := sess.(feeder); ok {
			// Made before anything can close app (fail, handover), so
			// that whatever does can unpark it first.
			sp.feed = f.NewFeed(&sp.src, sp.upDone)
		}
	}
	if !sp.downEnd {
		sp.pending.Add(1)
	}
	sp.stop = context.AfterFunc(abort, sp.aborted)
	// A hand-over stops this splice through ctl once it has frozen the
	// session: with one direction ended, nothing else would wake the
	// other from its socket. Frozen before we got here: stop now.
	ctl.set(sp.handover)
	if sess.Frozen() {
		sp.handover()
	}
	if sp.pending.Load() == 0 {
		// Both directions ended before a hand-over: nothing to start.
		go sp.end()
		return
	}
	if !sp.downEnd {
		// session -> application: the session writes from its receive
		// buffer straight to the socket (one writev per batch).
		if d, ok := sess.(deliverer); ok {
			d.DeliverTo(app, sp.delivered)
		} else {
			go func() {
				sp.downResult(sess.WriteTo(app))
				sp.ended(true)
			}()
		}
	}
	// application -> session: the reads go straight into the replay
	// buffer (no intermediate copy).
	switch {
	case sp.upEnded:
	case sp.feed != nil:
		sp.feed.Start()
	default:
		go func() { sp.upDone(sess.ReadFrom(&sp.src)) }()
	}
}

// splice is one join's state.
type splice struct {
	app    *net.TCPConn
	sess   session
	abort  context.Context
	ctl    *spliceCtl
	finish func(spliceResult)

	up, down  atomic.Int64
	once      sync.Once // fail
	abortedMu sync.Mutex
	res       spliceResult
	// handedOver is set once the session is frozen for a hand-over:
	// both directions then stop where they are, nothing is closed or
	// reset, and the new process goes on from there.
	handedOver atomic.Bool
	// upEnded and downEnd are written by their direction and read by
	// end, which runs after both (pending orders them).
	upEnded, downEnd bool
	// pending is the number of directions still running; the one that
	// takes it to zero finishes the splice.
	pending   atomic.Int32
	src       countingReader
	feed      *resume.Feed // nil: the session has no feeds
	stop      func() bool  // the abort's AfterFunc
	abortDone chan struct{}
}

func (sp *splice) unpark() {
	if sp.feed != nil {
		sp.feed.Unpark()
	}
}

func (sp *splice) handover() {
	if sp.handedOver.CompareAndSwap(false, true) {
		// The direction still waiting on the socket returns now.
		sp.unpark()
		sp.app.SetDeadline(time.Unix(1, 0))
	}
}

// stopped reports whether err means the hand-over stopped a direction:
// the session said so, or our own past deadline did.
func (sp *splice) stopped(err error) bool {
	if isFrozen(err) {
		sp.handover()
		return true
	}
	return sp.handedOver.Load() && errors.Is(err, os.ErrDeadlineExceeded)
}

// fail aborts both sides once: the application gets an RST, the peer a
// RESET (a no-op if the session already ended with an error).
func (sp *splice) fail(code resume.Code, reason string, err error) {
	sp.once.Do(func() {
		sp.abortedMu.Lock()
		sp.res.Cause = causeOf(code)
		var ec *endCause
		if errors.As(err, &ec) {
			sp.res.Cause = ec.cause
		}
		sp.res.Err = err
		sp.abortedMu.Unlock()
		sp.unpark()
		resetTCP(sp.app)
		sp.sess.Reset(code, reason)
	})
}

// aborted runs when abort is cancelled.
func (sp *splice) aborted() {
	defer close(sp.abortDone)
	ec := shutdownEnd
	errors.As(context.Cause(sp.abort), &ec)
	sp.fail(ec.code, ec.reason, ec)
}

// end runs once both directions have ended.
func (sp *splice) end() {
	sp.ctl.set(nil)
	if !sp.stop() {
		<-sp.abortDone // the abort ran (or runs): let it finish with res
	}
	sp.abortedMu.Lock()
	res := sp.res
	sp.abortedMu.Unlock()
	aborted := res.Cause != ""
	res.Up, res.Down = sp.up.Load(), sp.down.Load()
	res.UpDone, res.DownDone = sp.upEnded, sp.downEnd
	if !aborted && sp.handedOver.Load() {
		res.Cause = causeHandover
		sp.finish(res)
		return
	}
	if !aborted {
		// Both directions ended in order: Close waits until the peer has
		// acknowledged what we sent (bounded by the linger timeout).
		err := sp.sess.Close()
		if isFrozen(err) {
			// Frozen while it waited: the new process closes it.
			sp.app.SetDeadline(time.Unix(1, 0))
			res.Cause = causeHandover
			sp.finish(res)
			return
		}
		res.Cause = "closed"
		if err != nil && !errors.Is(err, resume.ErrConnClosed) {
			res.Err = err
		}
		sp.app.Close()
	}
	sp.finish(res)
}

// ended is called by each direction as it ends; inline says the caller's
// goroutine may run end (it is none of the session's own, which end's
// Close may wait for).
func (sp *splice) ended(inline bool) {
	if sp.pending.Add(-1) != 0 {
		return
	}
	if inline {
		sp.end()
	} else {
		go sp.end()
	}
}

// delivered is DeliverTo's done: the session -> application direction
// ended, in one of the session's goroutines.
func (sp *splice) delivered(n int64, err error) {
	sp.downResult(n, err)
	sp.ended(false)
}

func (sp *splice) downResult(n int64, err error) {
	sp.down.Add(n)
	var se *resume.Error
	switch {
	case err == nil: // the peer's FIN, after all its data
		if err := sp.app.CloseWrite(); err != nil && !isLocalClose(err) {
			sp.fail(frame.CodeAppReset, "application connection: "+err.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: err.Error()})
			return
		}
		sp.downEnd = true
	case sp.stopped(err):
	case errors.Is(err, resume.ErrConnClosed):
		// We reset it ourselves (fail is a no-op then), or the session
		// was reset behind the splice's back: the TCP connection must
		// not wait for its own side to notice.
		sp.fail(frame.CodeAppReset, "session closed locally", err)
	case errors.As(err, &se):
		code, reason := sessionCode(err)
		sp.fail(code, reason, err)
	case isLocalClose(err):
	default: // the application's socket failed
		sp.fail(frame.CodeAppReset, "application connection: "+err.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: err.Error()})
	}
}

// upDone is the application -> session direction's end (the feed's done,
// or ReadFrom's return).
func (sp *splice) upDone(n int64, err error) {
	sp.upResult(n, err)
	sp.ended(true)
}

func (sp *splice) upResult(_ int64, err error) {
	src := &sp.src
	switch {
	case err == nil: // the application's FIN
		if err := sp.sess.CloseWrite(); err != nil {
			if sp.stopped(err) {
				// The FIN stays unread in the socket for the new process
				// (a read after FIN returns EOF again).
				return
			}
			code, reason := sessionCode(err)
			sp.fail(code, reason, err)
			return
		}
		sp.upEnded = true
	case sp.stopped(err) || sp.stopped(src.err):
	case src.err != nil:
		if isLocalClose(src.err) {
			return // the other direction aborted and closed app
		}
		sp.fail(frame.CodeAppReset, "application connection: "+src.err.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: src.err.Error()})
	default:
		code, reason := sessionCode(err)
		sp.fail(code, reason, err)
	}
}

// feeder is a session whose application -> session reads can wait
// without a goroutine of ours (resume.Conn.NewFeed).
type feeder interface {
	NewFeed(src resume.SocketSource, done func(n int64, err error)) *resume.Feed
}

// causeHandover is spliceResult.Cause for a splice stopped by a
// hand-over: the session and its TCP socket are left as they are.
const causeHandover = "handover"

// spliceCtl lets a hand-over stop a running splice.
type spliceCtl struct {
	mu   sync.Mutex
	stop func()
}

func (c *spliceCtl) set(f func()) {
	c.mu.Lock()
	c.stop = f
	c.mu.Unlock()
}

// handover stops the splice, if one runs, for a hand-over: call it only
// once the session is frozen.
func (c *spliceCtl) handover() {
	c.mu.Lock()
	f := c.stop
	c.mu.Unlock()
	if f != nil {
		f()
	}
}

// spliceFrom is where a splice starts: a session handed over by another
// process may have one direction ended already.
type spliceFrom struct{ UpDone, DownDone bool }

// isFrozen reports whether err says the session was frozen for a
// hand-over.
func isFrozen(err error) bool { return errors.Is(err, resume.ErrFrozen) }

// sessionCode maps a session error to the code that aborts the splice.
// The session has already ended, so Reset only releases it.
func sessionCode(err error) (resume.Code, string) {
	var e *resume.Error
	if errors.As(err, &e) {
		return e.Code, e.Reason
	}
	if errors.Is(err, resume.ErrWriteClosed) {
		return frame.CodeValidation, err.Error()
	}
	return frame.CodeInternal, err.Error()
}

func causeOf(code resume.Code) string { return strings.ToLower(code.String()) }

// resetTCP closes c with an RST instead of a FIN.
func resetTCP(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

func isLocalClose(err error) bool { return errors.Is(err, net.ErrClosed) }
