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
// are started.
//
// A feed parked in the poller does not see its socket closed or its
// deadline set, so everything here that does either (fail, handover)
// unparks it first.
func join(app *net.TCPConn, sess session, abort context.Context, from spliceFrom, ctl *spliceCtl, finish func(spliceResult)) {
	var (
		up, down  atomic.Int64
		once      sync.Once
		res       spliceResult
		abortedMu sync.Mutex
		// handedOver is set once the session is frozen for a hand-over:
		// both directions then stop where they are, nothing is closed
		// or reset, and the new process goes on from there.
		handedOver       atomic.Bool
		upEnded, downEnd = from.UpDone, from.DownDone
		// pending is the number of directions still running; the one
		// that takes it to zero finishes the splice.
		pending atomic.Int32
		src     = &countingReader{r: app, tc: app, n: &up}
		unpark  = func() {}
		upDone  func(n int64, err error) // set below
		feed    *resume.Feed
	)
	if !upEnded {
		pending.Add(1)
		if f, ok := sess.(feeder); ok {
			// Made before anything can close app (fail, handover), so
			// that whatever does can unpark it first.
			feed = f.NewFeed(src, func(n int64, err error) { upDone(n, err) })
			unpark = feed.Unpark
		}
	}
	if !downEnd {
		pending.Add(1)
	}
	handover := func() {
		if handedOver.CompareAndSwap(false, true) {
			// The direction still waiting on the socket returns now.
			unpark()
			app.SetDeadline(time.Unix(1, 0))
		}
	}
	// stopped reports whether err means the hand-over stopped a
	// direction: the session said so, or our own past deadline did.
	stopped := func(err error) bool {
		if isFrozen(err) {
			handover()
			return true
		}
		return handedOver.Load() && errors.Is(err, os.ErrDeadlineExceeded)
	}
	// fail aborts both sides once: the application gets an RST, the peer a
	// RESET (a no-op if the session already ended with an error).
	fail := func(code resume.Code, reason string, err error) {
		once.Do(func() {
			abortedMu.Lock()
			res.Cause = causeOf(code)
			var ec *endCause
			if errors.As(err, &ec) {
				res.Cause = ec.cause
			}
			res.Err = err
			abortedMu.Unlock()
			unpark()
			resetTCP(app)
			sess.Reset(code, reason)
		})
	}

	abortDone := make(chan struct{})
	stop := context.AfterFunc(abort, func() {
		defer close(abortDone)
		ec := shutdownEnd
		errors.As(context.Cause(abort), &ec)
		fail(ec.code, ec.reason, ec)
	})
	// end runs once both directions have ended.
	end := func() {
		ctl.set(nil)
		if !stop() {
			<-abortDone // the abort ran (or runs): let it finish with res
		}
		abortedMu.Lock()
		aborted := res.Cause != ""
		abortedMu.Unlock()
		res.Up, res.Down = up.Load(), down.Load()
		res.UpDone, res.DownDone = upEnded, downEnd
		if !aborted && handedOver.Load() {
			res.Cause = causeHandover
			finish(res)
			return
		}
		if !aborted {
			// Both directions ended in order: Close waits until the peer
			// has acknowledged what we sent (bounded by the linger
			// timeout).
			err := sess.Close()
			if isFrozen(err) {
				// Frozen while it waited: the new process closes it.
				app.SetDeadline(time.Unix(1, 0))
				res.Cause = causeHandover
				finish(res)
				return
			}
			res.Cause = "closed"
			if err != nil && !errors.Is(err, resume.ErrConnClosed) {
				res.Err = err
			}
			app.Close()
		}
		finish(res)
	}
	// ended is called by each direction as it ends; inline says the
	// caller's goroutine may run end (it is none of the session's own,
	// which end's Close may wait for).
	ended := func(inline bool) {
		if pending.Add(-1) != 0 {
			return
		}
		if inline {
			end()
		} else {
			go end()
		}
	}
	// A hand-over stops this splice through ctl once it has frozen the
	// session: with one direction ended, nothing else would wake the
	// other from its socket. Frozen before we got here: stop now.
	ctl.set(handover)
	if sess.Frozen() {
		handover()
	}
	if pending.Load() == 0 {
		// Both directions ended before a hand-over: nothing to start.
		go end()
		return
	}

	// session -> application: the session writes from its receive buffer
	// straight to the socket (one writev per batch).
	downResult := func(n int64, err error) {
		down.Add(n)
		var se *resume.Error
		switch {
		case err == nil: // the peer's FIN, after all its data
			if err := app.CloseWrite(); err != nil && !isLocalClose(err) {
				fail(frame.CodeAppReset, "application connection: "+err.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: err.Error()})
				return
			}
			downEnd = true
		case stopped(err):
		case errors.Is(err, resume.ErrConnClosed):
			// We reset it ourselves (fail is a no-op then), or the
			// session was reset behind the splice's back: the TCP
			// connection must not wait for its own side to notice.
			fail(frame.CodeAppReset, "session closed locally", err)
		case errors.As(err, &se):
			code, reason := sessionCode(err)
			fail(code, reason, err)
		case isLocalClose(err):
		default: // the application's socket failed
			fail(frame.CodeAppReset, "application connection: "+err.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: err.Error()})
		}
	}
	// application -> session: the reads go straight into the replay
	// buffer (no intermediate copy).
	upResult := func(_ int64, err error) {
		switch {
		case err == nil: // the application's FIN
			if err := sess.CloseWrite(); err != nil {
				if stopped(err) {
					// The FIN stays unread in the socket for the new
					// process (a read after FIN returns EOF again).
					return
				}
				code, reason := sessionCode(err)
				fail(code, reason, err)
				return
			}
			upEnded = true
		case stopped(err) || stopped(src.err):
		case src.err != nil:
			if isLocalClose(src.err) {
				return // the other direction aborted and closed app
			}
			fail(frame.CodeAppReset, "application connection: "+src.err.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: src.err.Error()})
		default:
			code, reason := sessionCode(err)
			fail(code, reason, err)
		}
	}
	upDone = func(n int64, err error) {
		upResult(n, err)
		ended(true)
	}

	if !downEnd {
		if d, ok := sess.(deliverer); ok {
			d.DeliverTo(app, func(n int64, err error) {
				downResult(n, err)
				ended(false)
			})
		} else {
			go func() {
				downResult(sess.WriteTo(app))
				ended(true)
			}()
		}
	}
	switch {
	case upEnded:
	case feed != nil:
		feed.Start()
	default:
		go func() { upDone(sess.ReadFrom(src)) }()
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
