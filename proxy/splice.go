package proxy

import (
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/resume"
)

// Session is the part of *resume.Conn the splice uses.
type Session interface {
	net.Conn
	CloseWrite() error
	Reset(code resume.Code, reason string) error
}

// spliceResult says how a splice ended.
type spliceResult struct {
	Cause string // "closed", or a lower-case code name such as "app_reset", "buffer_lost"
	Err   error  // the abort error, nil for an orderly end
	Up    int64  // bytes from the application into the session
	Down  int64  // bytes from the session to the application
}

const spliceBuf = 32 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, spliceBuf); return &b }}

// splice joins a TCP application connection and a session until both
// directions have ended, then closes both. A FIN from either side becomes a
// FIN on the other after all data (half-close); an application RST becomes
// a session RESET with APP_RESET, and a session abort (any code) resets the
// application socket. abort, when closed, aborts the splice with code
// SHUTTING_DOWN (force-close after a drain timeout).
func splice(app *net.TCPConn, sess Session, abortCh <-chan struct{}) spliceResult {
	var (
		up, down  atomic.Int64
		once      sync.Once
		res       spliceResult
		wg        sync.WaitGroup
		finished  = make(chan struct{})
		abortedMu sync.Mutex
	)
	// fail aborts both sides once: the application gets an RST, the peer a
	// RESET (a no-op if the session already ended with an error).
	fail := func(code resume.Code, reason string, err error) {
		once.Do(func() {
			abortedMu.Lock()
			res.Cause = causeOf(code)
			res.Err = err
			abortedMu.Unlock()
			resetTCP(app)
			sess.Reset(code, reason)
		})
	}

	wg.Add(2)
	// application -> session
	go func() {
		defer wg.Done()
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		buf := *bp
		for {
			n, rerr := app.Read(buf)
			if n > 0 {
				if _, werr := sess.Write(buf[:n]); werr != nil {
					code, reason := sessionCode(werr)
					fail(code, reason, werr)
					return
				}
				up.Add(int64(n))
			}
			if rerr == io.EOF {
				if err := sess.CloseWrite(); err != nil {
					code, reason := sessionCode(err)
					fail(code, reason, err)
				}
				return
			}
			if rerr != nil {
				if isLocalClose(rerr) {
					return // the other direction aborted and closed app
				}
				fail(frame.CodeAppReset, "application connection: "+rerr.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: rerr.Error()})
				return
			}
		}
	}()
	// session -> application
	go func() {
		defer wg.Done()
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		buf := *bp
		for {
			n, rerr := sess.Read(buf)
			if n > 0 {
				if _, werr := app.Write(buf[:n]); werr != nil {
					if isLocalClose(werr) {
						return
					}
					fail(frame.CodeAppReset, "application connection: "+werr.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: werr.Error()})
					return
				}
				down.Add(int64(n))
			}
			if rerr == io.EOF {
				if err := app.CloseWrite(); err != nil && !isLocalClose(err) {
					fail(frame.CodeAppReset, "application connection: "+err.Error(), &resume.Error{Code: frame.CodeAppReset, Reason: err.Error()})
				}
				return
			}
			if rerr != nil {
				if errors.Is(rerr, resume.ErrConnClosed) {
					return // we reset it ourselves
				}
				code, reason := sessionCode(rerr)
				fail(code, reason, rerr)
				return
			}
		}
	}()
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-abortCh:
		fail(frame.CodeShuttingDown, "proxy shutting down", &resume.Error{Code: frame.CodeShuttingDown, Reason: "drain timeout"})
		<-finished
	}

	abortedMu.Lock()
	aborted := res.Cause != ""
	abortedMu.Unlock()
	if !aborted {
		// Both directions ended in order: Close waits until the peer has
		// acknowledged what we sent (bounded by the linger timeout).
		res.Cause = "closed"
		if err := sess.Close(); err != nil && !errors.Is(err, resume.ErrConnClosed) {
			res.Err = err
		}
		app.Close()
	}
	res.Up, res.Down = up.Load(), down.Load()
	return res
}

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

// isReset reports whether err is a connection reset by the peer.
func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}
