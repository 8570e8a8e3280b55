package acceptloop

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeListener fails its first len(errs) Accepts with errs[i], then
// returns one end of a pipe per call, or blocks until unblock is closed
// when block is set. Every call records the time and the State's Err.
type fakeListener struct {
	errs    []error
	s       *State
	block   bool
	unblock chan struct{}

	mu    sync.Mutex
	calls []call
}

type call struct {
	at  time.Time
	err error // s.Err() when Accept was called
}

func (l *fakeListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	n := len(l.calls)
	l.calls = append(l.calls, call{time.Now(), l.s.Err()})
	l.mu.Unlock()
	if n < len(l.errs) {
		return nil, l.errs[n]
	}
	if l.block {
		<-l.unblock
		return nil, net.ErrClosed
	}
	a, b := net.Pipe()
	b.Close()
	return a, nil
}

func (l *fakeListener) Close() error   { return nil }
func (l *fakeListener) Addr() net.Addr { return fakeAddr{} }

type fakeAddr struct{}

func (fakeAddr) Network() string { return "tcp" }
func (fakeAddr) String() string  { return "fake:7000" }

// emfile is the error net.TCPListener.Accept returns at the descriptor limit.
func emfile() error {
	return &net.OpError{Op: "accept", Net: "tcp", Addr: fakeAddr{}, Err: os.NewSyscallError("accept4", syscall.EMFILE)}
}

// recorder keeps log records.
type recorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	r.recs = append(r.recs, rec.Clone())
	r.mu.Unlock()
	return nil
}
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *recorder) WithGroup(string) slog.Handler      { return r }

func (r *recorder) records() []slog.Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]slog.Record(nil), r.recs...)
}

func attr(rec slog.Record, key string) slog.Value {
	var v slog.Value
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == key {
			v = a.Value
			return false
		}
		return true
	})
	return v
}

// Descriptor exhaustion (EMFILE) is retried with net/http's backoff (5 ms
// doubling to 1 s) instead of ending the accept loop; Err reports the
// condition with its cause and count while it lasts and is nil after the
// next accept; the log gets at most one line a second, the others counted.
func TestAcceptSurvivesDescriptorExhaustion(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 12
		rec := &recorder{}
		s := &State{Log: slog.New(rec)}
		l := &fakeListener{s: s}
		for range n {
			l.errs = append(l.errs, emfile())
		}
		start := time.Now()
		c, err := Accept(l, s, nil)
		if err != nil {
			t.Fatalf("Accept: %v, want the connection after %d EMFILEs", err, n)
		}
		c.Close()
		if err := s.Err(); err != nil {
			t.Errorf("Err after a successful accept: %v", err)
		}

		if len(l.calls) != n+1 {
			t.Fatalf("%d Accept calls, want %d", len(l.calls), n+1)
		}
		want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000}
		for i := 1; i < len(l.calls); i++ {
			gap := l.calls[i].at.Sub(l.calls[i-1].at)
			if gap != want[i-1]*time.Millisecond {
				t.Errorf("retry %d after %v, want %v", i, gap, want[i-1]*time.Millisecond)
			}
		}
		if l.calls[0].err != nil {
			t.Errorf("Err before any failure: %v", l.calls[0].err)
		}
		for i := 1; i < len(l.calls); i++ {
			e := l.calls[i].err
			if e == nil {
				t.Fatalf("Err nil during the failure run (call %d)", i)
			}
			wantMsg := fmt.Sprintf("accept on fake:7000: too many open files (since %s, %d failures)", start.Format(time.TimeOnly), i)
			if e.Error() != wantMsg {
				t.Errorf("Err %q, want %q", e, wantMsg)
			}
			if !errors.Is(e, syscall.EMFILE) {
				t.Errorf("Err %v does not wrap EMFILE", e)
			}
		}

		// Failures at 0, 5, 15, 35, 75, 155, 315, 635, 1275, 2275, 3275,
		// 4275 ms: lines at 0, 1275, 2275, 3275, 4275; recovery at 5275.
		var warns, suppressed int
		var last time.Time
		for i, r := range rec.records() {
			if i > 0 && r.Time.Sub(last) < time.Second {
				t.Errorf("log lines %v apart: %q after the previous", r.Time.Sub(last), r.Message)
			}
			last = r.Time
			suppressed += int(attr(r, "suppressed").Int64())
			if r.Level == slog.LevelWarn {
				warns++
			}
		}
		recs := rec.records()
		if warns != 5 || len(recs) != 6 {
			t.Errorf("%d log lines (%d warnings), want 5 warnings and 1 recovery line", len(recs), warns)
		}
		if warns+suppressed != n {
			t.Errorf("%d warnings + %d suppressed, want the %d failures", warns, suppressed, n)
		}
		if r := recs[len(recs)-1]; r.Message != "accept recovered" || attr(r, "failures").Int64() != n {
			t.Errorf("last line %q failures=%v, want the recovery with %d failures", r.Message, attr(r, "failures"), n)
		}
	})
}

// Closing done ends a backoff sleep at once with net.ErrClosed, so that a
// server shuts down without waiting out a 1 s retry.
func TestAcceptDoneCutsBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &State{}
		l := &fakeListener{s: s}
		for range 100 {
			l.errs = append(l.errs, emfile())
		}
		done := make(chan struct{})
		start := time.Now()
		go func() {
			time.Sleep(2 * time.Second)
			close(done)
		}()
		_, err := Accept(l, s, done)
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept: %v, want net.ErrClosed", err)
		}
		if d := time.Since(start); d != 2*time.Second {
			t.Errorf("returned %v after start, want at once when done closed (2s)", d)
		}
	})
}

// A permanent error ends Accept at once and stays reported; a closed
// listener ends it quietly.
func TestAcceptPermanentErrors(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		rec := &recorder{}
		s := &State{Log: slog.New(rec), Name: "links"}
		inval := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EINVAL)}
		l := &fakeListener{s: s, errs: []error{inval}}
		start := time.Now()
		if _, err := Accept(l, s, nil); !errors.Is(err, syscall.EINVAL) {
			t.Fatalf("Accept: %v, want EINVAL", err)
		}
		if time.Since(start) != 0 || len(l.calls) != 1 {
			t.Errorf("permanent error retried: %d calls in %v", len(l.calls), time.Since(start))
		}
		if err := s.Err(); err == nil || !strings.HasPrefix(err.Error(), "accept on links: invalid argument") {
			t.Errorf("Err %v, want the permanent error", err)
		}
		time.Sleep(time.Hour)
		if s.Err() == nil {
			t.Errorf("permanent error forgotten after an hour")
		}
		if r := rec.records(); len(r) != 1 || r[0].Level != slog.LevelError {
			t.Errorf("log %v, want one error line", r)
		}

		s2 := &State{}
		l2 := &fakeListener{s: s2, errs: []error{&net.OpError{Op: "accept", Net: "tcp", Err: net.ErrClosed}}}
		if _, err := Accept(l2, s2, nil); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept: %v, want net.ErrClosed", err)
		}
		if err := s2.Err(); err != nil {
			t.Errorf("Err after close: %v", err)
		}
	})
}

// With no descriptor free, accept fails even when no connection waits;
// once descriptors return, the retry blocks waiting for one. That is
// healthy, so Err clears without a new connection arriving.
func TestAcceptErrClearsWhenFailuresStop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := &State{}
		l := &fakeListener{s: s, errs: []error{emfile(), emfile(), emfile()}, block: true, unblock: make(chan struct{})}
		start := time.Now()
		done := make(chan error)
		go func() {
			_, err := Accept(l, s, nil)
			done <- err
		}()
		synctest.Wait() // blocked in the fourth Accept, 35 ms in
		if s.Err() == nil {
			t.Fatal("Err nil right after the failures")
		}
		// The last failure was at 15 ms, with a 20 ms backoff: reported
		// for two backoffs and a second more.
		stale := start.Add(15*time.Millisecond + 2*20*time.Millisecond + time.Second)
		time.Sleep(time.Until(stale))
		if s.Err() == nil {
			t.Fatal("Err nil within the grace period")
		}
		time.Sleep(time.Millisecond)
		if err := s.Err(); err != nil {
			t.Errorf("Err %v while accept waits without failing", err)
		}
		close(l.unblock)
		<-done
	})
}

func TestTemporary(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{emfile(), true},
		{syscall.ENFILE, true},
		{fmt.Errorf("x: %w", syscall.ENOBUFS), true},
		{syscall.ECONNABORTED, true},
		{os.ErrDeadlineExceeded, true},
		{net.ErrClosed, false},
		{syscall.EINVAL, false},
		{errors.New("other"), false},
	} {
		if got := Temporary(c.err); got != c.want {
			t.Errorf("Temporary(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}
