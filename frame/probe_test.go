package frame

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

var errEmptyNow = errors.New("nothing now")

// probeSource gives its chunks one per Read; with nowait on, an empty
// source fails with errEmptyNow, as a TLSSocket under a *tls.Conn does.
type probeSource struct {
	chunks [][]byte
	nowait bool
	end    error // after the chunks, for waiting reads
}

func (p *probeSource) Read(b []byte) (int, error) {
	if len(p.chunks) == 0 {
		if p.nowait {
			return 0, errEmptyNow
		}
		return 0, p.end
	}
	n := copy(b, p.chunks[0])
	if p.chunks[0] = p.chunks[0][n:]; len(p.chunks[0]) == 0 {
		p.chunks = p.chunks[1:]
	}
	return n, nil
}

func dataFrame(s string) []byte { return append(AppendDataHeader(nil, len(s)), s...) }

// readDataFrame reads the next frame from r and checks that it is DATA
// holding want.
func readDataFrame(t *testing.T, r *Reader, want string) {
	t.Helper()
	h, err := r.Next()
	if err != nil || h.Type != TypeData || h.Len != len(want) {
		t.Fatalf("Next: %v %v, want DATA %q", h, err, want)
	}
	got := make([]byte, h.Len)
	if _, err := r.ReadData(got); err != nil || !bytes.Equal(got, []byte(want)) {
		t.Fatalf("ReadData: %q %v, want %q", got, err, want)
	}
}

// With a probe the idle wait runs only when the source has nothing; bytes
// the probe finds are read in order, and an error other than "nothing
// now" is Next's.
func TestReaderIdleProbe(t *testing.T) {
	src := &probeSource{chunks: [][]byte{dataFrame("one")}, end: io.EOF}
	r := NewReader(src, 64)
	waits := 0
	r.SetIdleProbe(func(on bool) { src.nowait = on }, func(err error) bool { return err == errEmptyNow })
	r.SetIdleWait(func() error {
		waits++
		if src.nowait {
			t.Fatal("idle wait with nowait still on")
		}
		if waits == 1 {
			src.chunks = append(src.chunks, dataFrame("two"))
		}
		return nil
	})
	readDataFrame(t, r, "one")
	if waits != 0 {
		t.Fatalf("%d waits with a frame at hand, want 0", waits)
	}
	readDataFrame(t, r, "two") // the probe finds nothing: one wait, which brings "two"
	if waits != 1 {
		t.Fatalf("%d waits, want 1", waits)
	}
	// A real error from the probe is returned, with no wait.
	boom := errors.New("boom")
	src.chunks = nil
	r.SetIdleProbe(func(bool) {}, func(err error) bool { return err == errEmptyNow })
	src.end = boom
	if _, err := r.Next(); err != boom {
		t.Fatalf("Next: %v, want %v", err, boom)
	}
	if waits != 1 {
		t.Fatalf("%d waits, want 1 (an error is not a wait)", waits)
	}
}

// A Reader reads a frame header before it takes a read-ahead buffer, when
// new and when woken from an idle wait: a wake-up that finds an error (a
// reset link) takes none, and a header that comes a byte at a time still
// parses.
func TestReaderWakeReadsHeaderFirst(t *testing.T) {
	src := &probeSource{chunks: [][]byte{dataFrame("one")}, end: io.ErrUnexpectedEOF}
	r := NewReader(src, 64)
	wake := 0
	r.SetIdleWait(func() error {
		wake++
		if wake == 1 {
			f := dataFrame("two")
			for i := range f { // one byte per Read
				src.chunks = append(src.chunks, f[i:i+1])
			}
		}
		return nil
	})
	for _, want := range []string{"one", "two"} {
		readDataFrame(t, r, want)
	}
	if _, err := r.Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("Next at the source's end: %v, want %v", err, io.ErrUnexpectedEOF)
	}
	if r.br != nil {
		t.Fatal("a wake-up that found only an error took a read-ahead buffer")
	}
	if wake != 2 { // before "two" and before the end: "one" came first
		t.Fatalf("%d idle waits, want 2", wake)
	}
	// A new Reader takes no buffer before a header arrives: a preamble
	// and a header that never come (a refused reconnect, a half-open
	// handshake) cost none.
	for _, read := range []func(*Reader) error{
		func(r *Reader) error { _, err := r.ReadPreamble(); return err },
		func(r *Reader) error { _, err := r.Next(); return err },
	} {
		r := NewReader(&probeSource{end: io.EOF}, 64)
		if err := read(r); err == nil || r.br != nil {
			t.Fatalf("on a closed source: %v, buffer taken %v; want an error and no buffer", err, r.br != nil)
		}
	}
}

var errTimeout = errors.New("deadline")

// With SetIdleSettle the idle wait only arranges the wait, and the
// header's read after it, still without a buffer, is settled: nil once
// the header is in; a failure with nothing read finds the Reader at a
// frame boundary holding no buffer, and settle decides (nil: read again;
// an error: Next's).
func TestReaderIdleSettle(t *testing.T) {
	src := &probeSource{chunks: [][]byte{dataFrame("one")}}
	r := NewReader(src, 64)
	type call struct {
		err   error
		empty bool
	}
	var calls []call
	step := 0
	r.SetIdleWait(func() error { return nil })
	r.SetIdleSettle(func(err error, empty bool) error {
		calls = append(calls, call{err, empty})
		if err == errTimeout && r.br != nil {
			t.Fatal("settled a failed read with a buffer taken")
		}
		if err == errTimeout && step == 0 {
			step++
			src.chunks = append(src.chunks, dataFrame("two")) // read again: "two"
			return nil
		}
		return err
	})
	readDataFrame(t, r, "one") // a new Reader: no idle wait, nothing to settle
	if len(calls) != 0 {
		t.Fatalf("settle called %d times for the first frame, want 0", len(calls))
	}
	src.end = errTimeout
	readDataFrame(t, r, "two") // a timeout, settled as "read again", then "two"
	if len(calls) != 2 || calls[0] != (call{errTimeout, true}) || calls[1] != (call{nil, false}) {
		t.Fatalf("settle calls %v, want a timeout with nothing read, then nil", calls)
	}
	// Half a header, then a timeout: not empty, and what settle returns
	// (nil) reads on; the header parses whole.
	calls = nil
	f := dataFrame("three")
	src.chunks = [][]byte{f[:2]}
	src.end = errTimeout
	r.SetIdleSettle(func(err error, empty bool) error {
		calls = append(calls, call{err, empty})
		if err == errTimeout {
			if empty {
				t.Fatal("half a header read, yet settled as empty")
			}
			src.chunks = append(src.chunks, f[2:])
			return nil
		}
		return err
	})
	readDataFrame(t, r, "three")
	if len(calls) != 2 || calls[0] != (call{errTimeout, false}) || calls[1] != (call{nil, false}) {
		t.Fatalf("settle calls %v, want a timeout after half a header, then nil", calls)
	}
	// A timeout settled as an error is Next's, and leaves no buffer.
	r.SetIdleSettle(func(err error, empty bool) error { return err })
	if _, err := r.Next(); err != errTimeout {
		t.Fatalf("Next: %v, want %v", err, errTimeout)
	}
	if r.br != nil {
		t.Fatal("a failed idle read settled as an error kept the buffer")
	}
}
