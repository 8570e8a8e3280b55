package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func sampleRecords() []*HandoverRecord {
	return []*HandoverRecord{
		{Kind: RecordSession, Route: "redis", App: "127.0.0.1:6379", Started: time.Unix(1700000000, 123456789), UpDone: true, Snapshot: []byte("snap-1")},
		{Kind: RecordUnspliced, Route: "default", App: "10.0.0.1:80", Started: time.Unix(1, 0), Snapshot: bytes.Repeat([]byte{7}, 1000)},
		{Kind: RecordApp, Route: "r", App: "127.0.0.1:5555", Listen: "127.0.0.1:6380", Gateway: "gw:7000", Started: time.Unix(2, 5)},
	}
}

// encodes with the socket flag that goes with kind, as send does.
func encode(t testing.TB, r *HandoverRecord) []byte {
	t.Helper()
	cp := *r
	if r.Kind != RecordUnspliced {
		cp.File = os.Stdin // only its presence is encoded
	}
	b, err := cp.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestHandoverRecordRoundTrip(t *testing.T) {
	for _, r := range sampleRecords() {
		b := encode(t, r)
		got, hasFD, err := ParseHandoverRecord(b)
		if err != nil {
			t.Fatalf("%+v: %v", r, err)
		}
		if hasFD != (r.Kind != RecordUnspliced) {
			t.Errorf("kind %d: hasFD %v", r.Kind, hasFD)
		}
		if got.Kind != r.Kind || got.Route != r.Route || got.App != r.App || got.Listen != r.Listen || got.Gateway != r.Gateway ||
			!got.Started.Equal(r.Started) || got.UpDone != r.UpDone || got.DownDone != r.DownDone || !bytes.Equal(got.Snapshot, r.Snapshot) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, r)
		}
	}
}

func TestHandoverRecordRejects(t *testing.T) {
	good := encode(t, sampleRecords()[0])
	cases := map[string][]byte{
		"empty":             nil,
		"future version":    append([]byte{HandoverRecordVersion + 1}, good[1:]...),
		"unknown kind":      append([]byte{good[0], 9}, good[2:]...),
		"unknown flag":      append([]byte{good[0], good[1], good[2] | 0x80}, good[3:]...),
		"truncated":         good[:len(good)-1],
		"trailing bytes":    append(append([]byte{}, good...), 0),
		"session, no fd":    append([]byte{good[0], good[1], good[2] &^ recHasFD}, good[3:]...),
		"truncated strings": good[:5],
	}
	for name, b := range cases {
		if _, _, err := ParseHandoverRecord(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, _, err := ParseHandoverRecord(cases["future version"]); !errors.Is(err, ErrRecordVersion) {
		t.Errorf("future version: %v, want ErrRecordVersion", err)
	}
	// Encoding refuses what decoding would.
	if _, err := (&HandoverRecord{Kind: RecordSession, Route: "r", Snapshot: []byte("s")}).MarshalBinary(); err == nil {
		t.Error("session without a socket encoded")
	}
	if _, err := (&HandoverRecord{Kind: RecordApp, Route: strings.Repeat("x", 70000), File: os.Stdin}).MarshalBinary(); err == nil {
		t.Error("70000-byte route encoded")
	}
}

// FuzzHandoverRecord: the decoder never panics, and what it accepts
// encodes back to the same bytes.
func FuzzHandoverRecord(f *testing.F) {
	for _, r := range sampleRecords() {
		f.Add(encode(f, r))
	}
	f.Add([]byte{})
	f.Add([]byte{HandoverRecordVersion, 1, 7, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, hasFD, err := ParseHandoverRecord(b)
		if err != nil {
			return
		}
		if hasFD {
			r.File = os.Stdin
		}
		out, err := r.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded record does not encode: %v", err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("re-encoded differently:\n in %x\nout %x", b, out)
		}
	})
}

// socketPair returns a connected Unix stream pair.
func socketPair(t *testing.T) (a, b *net.UnixConn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	a, b = conv(fds[0]), conv(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// fakeBatch stands for the old process's frozen sessions: each record
// carries a real TCP socket, to check that the descriptor arrives.
type fakeBatch struct {
	recs              []*HandoverRecord
	committed, rolled bool
	recordsErr        error
	mu                sync.Mutex
}

func (b *fakeBatch) Records() ([]*HandoverRecord, error) { return b.recs, b.recordsErr }
func (b *fakeBatch) Commit()                             { b.mu.Lock(); b.committed = true; b.mu.Unlock() }
func (b *fakeBatch) Rollback()                           { b.mu.Lock(); b.rolled = true; b.mu.Unlock() }

type fakeTaken struct {
	recs              []*HandoverRecord
	started, released bool
}

func (f *fakeTaken) Start()   { f.started = true }
func (f *fakeTaken) Release() { f.released = true; closeRecs(f.recs) }

// hoTCPPair returns both ends of a loopback TCP connection.
func hoTCPPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// newBatch makes a batch of one session record whose socket is one end
// of a TCP pair; peer is the other end.
func newBatch(t *testing.T) (b *fakeBatch, peer *net.TCPConn) {
	local, peer := hoTCPPair(t)
	f, err := local.File()
	if err != nil {
		t.Fatal(err)
	}
	app, err := tcpPairFile(t)
	if err != nil {
		t.Fatal(err)
	}
	return &fakeBatch{recs: []*HandoverRecord{
		{Kind: RecordSession, Route: "r", App: "up:1", Started: time.Now(), Snapshot: []byte("snapshot"), File: f},
		{Kind: RecordUnspliced, Route: "r", Snapshot: []byte("s2")},
		{Kind: RecordApp, Route: "r", Listen: "127.0.0.1:1", File: app},
	}}, peer
}

func tcpPairFile(t *testing.T) (*os.File, error) {
	a, _ := hoTCPPair(t)
	return a.File()
}

type serveResult struct {
	res HandoverResult
	err error
}

func runServe(c *net.UnixConn, b *fakeBatch, freezeErr error, timeout time.Duration) chan serveResult {
	ch := make(chan serveResult, 1)
	go func() {
		res, err := ServeHandover(c, func() (HandoverBatch, error) {
			if freezeErr != nil {
				return nil, freezeErr
			}
			return b, nil
		}, timeout)
		ch <- serveResult{res, err}
	}()
	return ch
}

func TestHandoverCommit(t *testing.T) {
	old, nw := socketPair(t)
	b, peer := newBatch(t)
	done := runServe(old, b, nil, 5*time.Second)
	var got []*HandoverRecord
	taken, n, err := RequestHandover(nw, HandoverHello{Protocol: HandoverProtocol, RecordVersion: HandoverRecordVersion, Version: "v2"},
		func(recs []*HandoverRecord) (HandoverTaken, error) {
			got = recs
			return &fakeTaken{recs: recs}, nil
		}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if n != 3 || r.res.Sessions != 3 || r.res.Peer.Version != "v2" || r.res.Peer.Pid != uint32(os.Getpid()) {
		t.Fatalf("n=%d result %+v", n, r.res)
	}
	if !b.committed || b.rolled {
		t.Fatalf("committed %v rolled back %v", b.committed, b.rolled)
	}
	if string(got[0].Snapshot) != "snapshot" || got[0].File == nil || got[1].File != nil || got[2].File == nil || got[2].Listen != "127.0.0.1:1" {
		t.Fatalf("records: %+v %+v %+v", got[0], got[1], got[2])
	}
	// The socket that arrived is the same connection: bytes written on
	// it reach the peer.
	c, err := net.FileConn(got[0].File)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("through the handed-over socket"))
	buf := make([]byte, 30)
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "through the handed-over socket" {
		t.Fatalf("read %q, %v", buf, err)
	}
	taken.(*fakeTaken).Release()
}

func TestHandoverRefused(t *testing.T) {
	old, nw := socketPair(t)
	b, _ := newBatch(t)
	done := runServe(old, b, nil, 5*time.Second)
	_, _, err := RequestHandover(nw, HandoverHello{Protocol: HandoverProtocol, RecordVersion: HandoverRecordVersion},
		func(recs []*HandoverRecord) (HandoverTaken, error) {
			closeRecs(recs)
			return nil, errors.New("snapshot version 9 not supported")
		}, 5*time.Second)
	if err == nil {
		t.Fatal("refusal returned nil")
	}
	r := <-done
	if !errors.Is(r.err, ErrHandoverRefused) || !strings.Contains(r.err.Error(), "snapshot version 9") {
		t.Fatalf("old side: %v", r.err)
	}
	if b.committed || !b.rolled {
		t.Fatalf("committed %v rolled back %v", b.committed, b.rolled)
	}
}

// An older new binary (record version 0) is turned away before anything
// is frozen.
func TestHandoverOldRecordVersion(t *testing.T) {
	old, nw := socketPair(t)
	b, _ := newBatch(t)
	defer closeRecs(b.recs)
	done := runServe(old, b, nil, 5*time.Second)
	_, _, err := RequestHandover(nw, HandoverHello{Protocol: HandoverProtocol, RecordVersion: 0},
		func(recs []*HandoverRecord) (HandoverTaken, error) { t.Error("restore called"); return nil, nil }, 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "gave up") {
		t.Fatalf("new side: %v", err)
	}
	if r := <-done; !errors.Is(r.err, ErrRecordVersion) {
		t.Fatalf("old side: %v", r.err)
	}
	if b.committed || b.rolled {
		t.Fatal("batch touched before freezing")
	}
}

// A new process that dies before it answers: the old one rolls back.
func TestHandoverPeerGone(t *testing.T) {
	old, nw := socketPair(t)
	b, _ := newBatch(t)
	done := runServe(old, b, nil, 5*time.Second)
	h := handoverConn{nw}
	h.send(hoHello, HandoverHello{Protocol: HandoverProtocol, RecordVersion: HandoverRecordVersion}.marshal(), nil)
	for {
		typ, _, f, err := h.recv()
		closeFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if typ == hoEnd {
			break
		}
	}
	nw.Close()
	r := <-done
	if r.err == nil || b.committed || !b.rolled {
		t.Fatalf("err %v committed %v rolled back %v", r.err, b.committed, b.rolled)
	}
}

// A new process that never says HELLO: the old one gives up after the
// timeout, without freezing.
func TestHandoverHelloTimeout(t *testing.T) {
	old, _ := socketPair(t)
	b, _ := newBatch(t)
	defer closeRecs(b.recs)
	start := time.Now()
	r := <-runServe(old, b, nil, 200*time.Millisecond)
	if r.err == nil || b.rolled || b.committed {
		t.Fatalf("err %v", r.err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("took %v", d)
	}
}

// A freeze that fails (sessions opening) aborts: the new process is told
// and gives up.
func TestHandoverFreezeFails(t *testing.T) {
	old, nw := socketPair(t)
	done := runServe(old, nil, errors.New("2 sessions still opening"), 5*time.Second)
	_, _, err := RequestHandover(nw, HandoverHello{Protocol: HandoverProtocol, RecordVersion: HandoverRecordVersion},
		func(recs []*HandoverRecord) (HandoverTaken, error) { t.Error("restore called"); return nil, nil }, 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "still opening") {
		t.Fatalf("new side: %v", err)
	}
	if r := <-done; r.err == nil {
		t.Fatal("old side: nil")
	}
}

// No COMMIT (the old process rolled back, or died): the new process
// releases what it restored.
func TestHandoverNoCommit(t *testing.T) {
	old, nw := socketPair(t)
	go func() {
		h := handoverConn{old}
		h.recv()
		h.send(hoEnd, []byte{0, 0, 0, 0}, nil)
		h.recv() // OK
		old.Close()
	}()
	ft := &fakeTaken{}
	taken, _, err := RequestHandover(nw, HandoverHello{Protocol: HandoverProtocol, RecordVersion: HandoverRecordVersion},
		func(recs []*HandoverRecord) (HandoverTaken, error) { return ft, nil }, 5*time.Second)
	if err == nil || taken != nil || !ft.released || ft.started {
		t.Fatalf("err %v taken %v released %v", err, taken, ft.released)
	}
}

func TestPausableListener(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pl := NewPausableListener(ln)
	defer pl.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := pl.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	// An Accept blocked in the socket is interrupted by Pause.
	time.Sleep(20 * time.Millisecond)
	if err := pl.Pause(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", ln.Addr().String()) // waits in the backlog
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case a := <-accepted:
		a.Close()
		t.Fatal("accepted while paused")
	case <-time.After(100 * time.Millisecond):
	}
	pl.Resume()
	select {
	case a := <-accepted:
		a.Close()
	case <-time.After(2 * time.Second):
		t.Fatal("not accepted after Resume")
	}
	// Pause again, then Close wakes the paused Accept.
	if err := pl.Pause(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	pl.Close()
	if _, ok := <-accepted; ok {
		t.Fatal("accepted after Close")
	}
}

// FuzzHandoverHello: any HELLO payload parses or is refused, and what
// parses encodes back to the same bytes.
func FuzzHandoverHello(f *testing.F) {
	f.Add(HandoverHello{Protocol: 1, RecordVersion: 1, SnapshotVersion: 1, Pid: 42, Version: "v1.2.3"}.marshal())
	f.Add([]byte{})
	f.Add([]byte{1, 1, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHello(b)
		if err != nil {
			return
		}
		if !bytes.Equal(h.marshal(), b) {
			t.Fatalf("HELLO %x re-encodes as %x", b, h.marshal())
		}
	})
}

// FuzzHandoverStream: whatever the old process's side sends, the new
// process's side neither panics nor hangs nor starts anything it was
// not committed: it returns an error, or sessions after a COMMIT.
func FuzzHandoverStream(f *testing.F) {
	rec := encode(f, &HandoverRecord{Kind: RecordUnspliced, Route: "r", Snapshot: []byte("s")})
	msg := func(typ byte, p []byte) []byte {
		return append([]byte{typ, byte(len(p) >> 24), byte(len(p) >> 16), byte(len(p) >> 8), byte(len(p))}, p...)
	}
	good := append(append(msg(hoSession, rec), msg(hoEnd, []byte{0, 0, 0, 1})...), msg(hoCommit, nil)...)
	f.Add(good)
	f.Add(msg(hoAbort, []byte("no")))
	f.Add(msg(hoEnd, []byte{0, 0, 0, 0}))
	f.Add([]byte{hoSession, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		old, nw := socketPair(t)
		go func() {
			h := handoverConn{old}
			h.recv() // HELLO
			old.Write(b)
			old.CloseWrite()
		}()
		started := false
		taken, _, err := RequestHandover(nw, HandoverHello{Protocol: HandoverProtocol, RecordVersion: HandoverRecordVersion},
			func(recs []*HandoverRecord) (HandoverTaken, error) {
				closeRecs(recs)
				return &fakeTaken{}, nil
			}, 2*time.Second)
		if err == nil {
			if taken == nil {
				t.Fatal("no error and no sessions")
			}
			started = true
		}
		if started && !bytes.Contains(b, []byte{hoCommit, 0, 0, 0, 0}) {
			t.Fatalf("sessions taken without a COMMIT in %x", b)
		}
	})
}

// A new process that takes COMMIT but never says DONE (hung): the old
// one rolls back after its timeout (and would kill it: its pid is 0
// here, so nothing is killed).
func TestHandoverNoDone(t *testing.T) {
	old, nw := socketPair(t)
	b, _ := newBatch(t)
	done := runServe(old, b, nil, 300*time.Millisecond)
	h := handoverConn{nw}
	h.send(hoHello, HandoverHello{Protocol: HandoverProtocol, RecordVersion: HandoverRecordVersion}.marshal(), nil)
	for {
		typ, _, f, err := h.recv()
		closeFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if typ == hoEnd {
			break
		}
	}
	h.send(hoOK, nil, nil)
	if typ, _, _, err := h.recv(); err != nil || typ != hoCommit {
		t.Fatalf("want COMMIT, got %q, %v", typ, err)
	}
	r := <-done // no DONE
	if r.err == nil || b.committed || !b.rolled {
		t.Fatalf("err %v committed %v rolled back %v", r.err, b.committed, b.rolled)
	}
}
