// Package acceptloop accepts connections the way net/http's Server.Serve
// does: a temporary failure (descriptor exhaustion above all) is retried
// with a backoff instead of ending the accept loop, and is logged at most
// once a second and recorded, so that a health check can report it. Only a
// permanent error (the listener was closed, or is broken) ends the loop.
package acceptloop

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

const (
	// MinDelay is the first backoff after a temporary failure; it doubles
	// up to MaxDelay, as in net/http's Server.Serve.
	MinDelay = 5 * time.Millisecond
	MaxDelay = time.Second
	// logEvery is the least time between two log lines of one State.
	logEvery = time.Second
)

// State records a listener's accept health; safe for concurrent use. The
// zero value is usable; set Log and Name before the first Accept.
type State struct {
	// Log receives the rate-limited failure and recovery lines (nil:
	// discard).
	Log *slog.Logger
	// Name names the listener in logs and in Err (default: its address).
	Name string

	mu         sync.Mutex
	err        error         // the last failure's cause; nil while healthy
	since      time.Time     // first failure of the current run
	last       time.Time     // latest failure
	delay      time.Duration // backoff after the latest failure
	failures   int           // in the current run
	logged     time.Time     // last log line
	suppressed int           // failures not logged since then
}

// Err is non-nil while accepts are failing, e.g. "accept on
// 127.0.0.1:7000: too many open files (since 12:00:01, 57 failures)"; it
// wraps the cause (errors.Is(err, syscall.EMFILE) holds). It is nil again
// after the next successful accept, and also once no failure has been seen
// for a while (the retry is then waiting for a connection, which is
// healthy: with no descriptor free, accept fails even with none pending).
func (s *State) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		return nil
	}
	if s.delay > 0 && time.Since(s.last) > 2*s.delay+logEvery {
		return nil
	}
	return &Error{Name: s.Name, Err: s.err, Since: s.since, Failures: s.failures}
}

// Error is what State.Err returns.
type Error struct {
	Name     string
	Err      error // the cause, e.g. syscall.EMFILE
	Since    time.Time
	Failures int
}

func (e *Error) Error() string {
	return fmt.Sprintf("accept on %s: %v (since %s, %d failures)", e.Name, e.Err, e.Since.Format(time.TimeOnly), e.Failures)
}

func (e *Error) Unwrap() error { return e.Err }

func (s *State) logger() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

func (s *State) name(l net.Listener) {
	s.mu.Lock()
	if s.Name == "" && l != nil && l.Addr() != nil {
		s.Name = l.Addr().String()
	}
	s.mu.Unlock()
}

// failed records a failure that is retried after delay (0: permanent).
func (s *State) failed(err error, delay time.Duration) {
	now := time.Now()
	s.mu.Lock()
	if s.err == nil || s.delay > 0 && now.Sub(s.last) > 2*s.delay+logEvery {
		s.since, s.failures = now, 0
	}
	s.err, s.last, s.delay = cause(err), now, delay
	s.failures++
	log := s.logged.IsZero() || now.Sub(s.logged) >= logEvery || delay == 0
	var suppressed int
	if log {
		s.logged, suppressed, s.suppressed = now, s.suppressed, 0
	} else {
		s.suppressed++
	}
	name, failures, since := s.Name, s.failures, s.since
	s.mu.Unlock()
	if !log {
		return
	}
	if delay == 0 {
		s.logger().Error("accept failed for good", "listen", name, "err", err)
		return
	}
	s.logger().Warn("accept failed; retrying", "listen", name, "err", err, "retry_in", delay,
		"failures", failures, "since", since.Format(time.TimeOnly), "suppressed", suppressed)
}

// succeeded clears a failure run.
func (s *State) succeeded() {
	s.mu.Lock()
	if s.err == nil {
		s.mu.Unlock()
		return
	}
	now := time.Now()
	failures, since := s.failures, s.since
	s.err, s.failures, s.delay = nil, 0, 0
	log := now.Sub(s.logged) >= logEvery
	var suppressed int
	if log {
		s.logged, suppressed, s.suppressed = now, s.suppressed, 0
	}
	name := s.Name
	s.mu.Unlock()
	if log {
		s.logger().Info("accept recovered", "listen", name, "failures", failures,
			"outage", now.Sub(since).Round(time.Millisecond), "suppressed", suppressed)
	}
}

// Accept calls l.Accept, retrying temporary failures (EMFILE, ENFILE,
// ENOBUFS, ENOMEM, ECONNABORTED, EAGAIN, the network errors Linux passes
// on from the new connection, net.Error timeouts) after a backoff of 5 ms
// doubling to 1 s, like net/http's Server.Serve. Each failure is recorded
// in s (see Err) and logged at Warn, at most one line a second with the
// count of those suppressed. It returns the connection, or only a
// permanent error: net.ErrClosed or any other error that is not
// temporary. Closing done makes a backoff sleep return at once with
// net.ErrClosed.
func Accept(l net.Listener, s *State, done <-chan struct{}) (net.Conn, error) {
	s.name(l)
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err == nil {
			s.succeeded()
			return c, nil
		}
		if errors.Is(err, net.ErrClosed) {
			return nil, err
		}
		if !Temporary(err) {
			s.failed(err, 0)
			return nil, err
		}
		delay = min(max(2*delay, MinDelay), MaxDelay)
		s.failed(err, delay)
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-done:
			t.Stop()
			return nil, fmt.Errorf("accept on %s: %w (while retrying after: %w)", s.Name, net.ErrClosed, err)
		}
	}
}

// temporaryErrnos are the accept errors that a retry can outlive:
// resource exhaustion, and the errors Linux's accept(2) passes on from a
// connection that failed before it was accepted.
var temporaryErrnos = []error{
	syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
	syscall.ECONNABORTED, syscall.EAGAIN, syscall.EINTR, syscall.ECONNRESET,
	syscall.EPROTO, syscall.ENETDOWN, syscall.ENETUNREACH, syscall.EHOSTDOWN,
	syscall.EHOSTUNREACH, syscall.ENOPROTOOPT, syscall.EOPNOTSUPP,
}

// Temporary reports whether an accept error is worth retrying.
func Temporary(err error) bool {
	if err == nil || errors.Is(err, net.ErrClosed) {
		return false
	}
	for _, e := range temporaryErrnos {
		if errors.Is(err, e) {
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// cause strips *net.OpError and *os.SyscallError: "accept tcp
// 127.0.0.1:7000: accept4: too many open files" becomes "too many open
// files".
func cause(err error) error {
	for {
		var oe *net.OpError
		var se *os.SyscallError
		switch {
		case errors.As(err, &oe) && oe.Err != nil:
			err = oe.Err
		case errors.As(err, &se) && se.Err != nil:
			err = se.Err
		default:
			return err
		}
	}
}

// Listener wraps l so that its Accept is Accept(l, s, done): for servers
// that run their own accept loop (net/http, the session server).
func Listener(l net.Listener, s *State, done <-chan struct{}) net.Listener {
	return &listener{Listener: l, s: s, done: done}
}

type listener struct {
	net.Listener
	s    *State
	done <-chan struct{}
}

func (l *listener) Accept() (net.Conn, error) { return Accept(l.Listener, l.s, l.done) }
