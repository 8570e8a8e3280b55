package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// The hand-over of an in-place upgrade (issue 12, docs/operations.md
// "Upgrading in place"): the old process gives the new one every session
// over a Unix socket pair: one record per session (HandoverRecord) and
// the session's local TCP socket (the upstream's on a gateway, the
// application's on a client) as SCM_RIGHTS. Links are not handed over:
// the peer resumes into the new process, as after any outage.
//
// The exchange, new process N, old process O, on a SOCK_STREAM pair:
//
//	N -> O  HELLO   protocol, record and snapshot versions, N's version
//	O -> N  SESSION record [+ its socket]   (once per session)
//	O -> N  END     number of SESSIONs
//	        (or ABORT reason: O could not freeze; it goes on serving)
//	N -> O  OK | REFUSE reason
//	O -> N  COMMIT
//	N -> O  DONE    (N took the sessions; only now may it start them)
//
// Until O reads DONE it can roll back (thaw and go on serving): N starts
// nothing before it has written DONE, so an N that dies, hangs or
// refuses leaves the sessions to O untouched. O kills an N that does not
// answer in time before it rolls back, so that a late DONE cannot start
// a second copy of a session.

// HandoverProtocol is the version of the exchange above.
const HandoverProtocol = 1

// HandoverRecordVersion is the version of HandoverRecord's encoding.
const HandoverRecordVersion = 1

// Hand-over message types.
const (
	hoHello   = 'H'
	hoSession = 'S'
	hoEnd     = 'E'
	hoAbort   = 'A'
	hoOK      = 'K'
	hoRefuse  = 'R'
	hoCommit  = 'C'
	hoDone    = 'D'
)

// maxHandoverMsg bounds one message: a record carries a session's two
// buffers (a few MiB at most with any sane buffer setting).
const maxHandoverMsg = 256 << 20

// RecordKind says what a HandoverRecord carries.
type RecordKind uint8

const (
	// RecordSession is a session spliced to its TCP socket: a snapshot
	// and the socket.
	RecordSession RecordKind = 1
	// RecordUnspliced is a gateway session that had not reached its
	// upstream: a snapshot, no socket; the new process dials the
	// upstream.
	RecordUnspliced RecordKind = 2
	// RecordApp is a client's application connection whose session had
	// not been opened: the socket, no snapshot; the new process opens
	// the session.
	RecordApp RecordKind = 3
)

// Record flags.
const (
	recUpDone   = 1 << 0 // the TCP side's FIN was passed into the session
	recDownDone = 1 << 1 // the session's FIN was passed to the TCP side
	recHasFD    = 1 << 2 // a socket travels with the record
	recAllFlags = recUpDone | recDownDone | recHasFD
)

// HandoverRecord is one session as the old process hands it over: the
// proxy's view of it (route, addresses, start time, which directions
// have ended) and the session engine's snapshot.
type HandoverRecord struct {
	Kind    RecordKind
	Route   string
	App     string    // the application's address (client) or the upstream (gateway)
	Listen  string    // client: the application listener's address, which names the route
	Gateway string    // client: the gateway as the route names it (logs)
	Started time.Time // when the session started (kept across upgrades)
	// UpDone and DownDone say which directions of the splice had ended:
	// the new process must not pass the TCP side's FIN into the session
	// twice, nor close the TCP side's write half twice.
	UpDone, DownDone bool
	// Snapshot is resume's encoding of the session (nil for RecordApp).
	Snapshot []byte
	// File is the TCP socket (nil for RecordUnspliced). Not encoded: it
	// travels as SCM_RIGHTS beside the record.
	File *os.File
}

// MarshalBinary encodes r (without its File).
func (r *HandoverRecord) MarshalBinary() ([]byte, error) {
	for _, s := range []string{r.Route, r.App, r.Listen, r.Gateway} {
		if len(s) > 0xffff {
			return nil, fmt.Errorf("handover record: field of %d bytes", len(s))
		}
	}
	if err := r.check(r.File != nil); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 32+len(r.Route)+len(r.App)+len(r.Listen)+len(r.Gateway)+len(r.Snapshot))
	b = append(b, HandoverRecordVersion, byte(r.Kind), r.flags())
	for _, s := range []string{r.Route, r.App, r.Listen, r.Gateway} {
		b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	b = binary.BigEndian.AppendUint64(b, uint64(r.Started.UnixNano()))
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Snapshot)))
	b = append(b, r.Snapshot...)
	return b, nil
}

func (r *HandoverRecord) flags() byte {
	var f byte
	if r.UpDone {
		f |= recUpDone
	}
	if r.DownDone {
		f |= recDownDone
	}
	if r.File != nil {
		f |= recHasFD
	}
	return f
}

// check reports what is inconsistent in r; hasFD says whether a socket
// travels with it.
func (r *HandoverRecord) check(hasFD bool) error {
	switch r.Kind {
	case RecordSession:
		if !hasFD || len(r.Snapshot) == 0 {
			return errors.New("handover record: a session record needs a socket and a snapshot")
		}
	case RecordUnspliced:
		if hasFD || len(r.Snapshot) == 0 || r.UpDone || r.DownDone {
			return errors.New("handover record: an unspliced record has a snapshot, no socket and no ended direction")
		}
	case RecordApp:
		if !hasFD || len(r.Snapshot) != 0 || r.UpDone || r.DownDone {
			return errors.New("handover record: an application record has a socket, no snapshot and no ended direction")
		}
	default:
		return fmt.Errorf("handover record: unknown kind %d", r.Kind)
	}
	if r.Route == "" {
		return errors.New("handover record: no route")
	}
	return nil
}

// ErrRecordVersion is returned for a record written by a format this
// binary does not read.
var ErrRecordVersion = errors.New("handover record version not supported")

// ParseHandoverRecord decodes a record written by MarshalBinary; File is
// left nil (the caller attaches the socket that came with it, if the
// record says one did: see HasFD). Snapshot aliases b.
func ParseHandoverRecord(b []byte) (r *HandoverRecord, hasFD bool, err error) {
	bad := func(what string) (*HandoverRecord, bool, error) {
		return nil, false, fmt.Errorf("handover record: %s", what)
	}
	if len(b) < 3 {
		return bad("truncated header")
	}
	if b[0] != HandoverRecordVersion {
		return nil, false, fmt.Errorf("%w: version %d (this binary reads %d)", ErrRecordVersion, b[0], HandoverRecordVersion)
	}
	r = &HandoverRecord{Kind: RecordKind(b[1])}
	fl := b[2]
	if fl&^recAllFlags != 0 {
		return bad(fmt.Sprintf("unknown flags %#x", fl))
	}
	r.UpDone, r.DownDone, hasFD = fl&recUpDone != 0, fl&recDownDone != 0, fl&recHasFD != 0
	b = b[3:]
	var strs [4]string
	for i := range strs {
		if len(b) < 2 {
			return bad("truncated string length")
		}
		n := int(binary.BigEndian.Uint16(b))
		b = b[2:]
		if len(b) < n {
			return bad("truncated string")
		}
		strs[i], b = string(b[:n]), b[n:]
	}
	r.Route, r.App, r.Listen, r.Gateway = strs[0], strs[1], strs[2], strs[3]
	if len(b) < 12 {
		return bad("truncated start time or snapshot length")
	}
	r.Started = time.Unix(0, int64(binary.BigEndian.Uint64(b)))
	n := binary.BigEndian.Uint32(b[8:])
	b = b[12:]
	if uint64(len(b)) != uint64(n) {
		return bad(fmt.Sprintf("snapshot of %d bytes, %d left", n, len(b)))
	}
	if n > 0 {
		r.Snapshot = b
	}
	if err := r.check(hasFD); err != nil {
		return nil, false, err
	}
	return r, hasFD, nil
}

// handoverConn frames the exchange on a Unix stream socket: a type byte,
// a 4-byte length, the payload; a socket rides on the header of its
// message. Every message is read exactly, so the header that carries a
// socket is always the start of one read (the kernel delivers the
// descriptors with the first byte of the write that carried them).
type handoverConn struct {
	c *net.UnixConn
}

func (h handoverConn) send(typ byte, payload []byte, f *os.File) error {
	if len(payload) > maxHandoverMsg {
		return fmt.Errorf("handover: message of %d bytes", len(payload))
	}
	hdr := make([]byte, 5)
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(payload)))
	if f != nil {
		n, _, err := h.c.WriteMsgUnix(hdr, syscall.UnixRights(int(f.Fd())), nil)
		if err != nil {
			return fmt.Errorf("handover: send: %w", err)
		}
		if n != len(hdr) {
			return fmt.Errorf("handover: short write with a socket (%d bytes)", n)
		}
	} else if _, err := h.c.Write(hdr); err != nil {
		return fmt.Errorf("handover: send: %w", err)
	}
	if _, err := h.c.Write(payload); err != nil {
		return fmt.Errorf("handover: send: %w", err)
	}
	return nil
}

// recv reads one message and the socket that came with it, if any.
func (h handoverConn) recv() (typ byte, payload []byte, f *os.File, err error) {
	hdr := make([]byte, 5)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	got := 0
	for got < len(hdr) {
		n, oobn, _, _, err := h.c.ReadMsgUnix(hdr[got:], oob)
		if oobn > 0 {
			fs, perr := parseRights(oob[:oobn])
			for i, fd := range fs {
				if f == nil && i == 0 {
					f = os.NewFile(uintptr(fd), "handover-socket")
				} else {
					syscall.Close(fd) // more than one: not ours to keep
				}
			}
			if perr != nil {
				closeFile(f)
				return 0, nil, nil, perr
			}
		}
		got += n
		if err != nil {
			closeFile(f)
			if err == io.EOF && got > 0 {
				err = io.ErrUnexpectedEOF
			}
			return 0, nil, nil, fmt.Errorf("handover: receive: %w", err)
		}
		if n == 0 {
			closeFile(f)
			return 0, nil, nil, fmt.Errorf("handover: receive: %w", io.EOF)
		}
	}
	size := binary.BigEndian.Uint32(hdr[1:])
	if size > maxHandoverMsg {
		closeFile(f)
		return 0, nil, nil, fmt.Errorf("handover: message of %d bytes", size)
	}
	payload = make([]byte, size)
	if _, err := io.ReadFull(h.c, payload); err != nil {
		closeFile(f)
		return 0, nil, nil, fmt.Errorf("handover: receive: %w", err)
	}
	return hdr[0], payload, f, nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("handover: control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		r, err := syscall.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		fds = append(fds, r...)
	}
	return fds, nil
}

func closeRecs(recs []*HandoverRecord) {
	for _, r := range recs {
		closeFile(r.File)
	}
}

func closeFile(f *os.File) {
	if f != nil {
		f.Close()
	}
}

// HandoverHello is what the new process tells the old one first.
type HandoverHello struct {
	Protocol        uint8
	RecordVersion   uint8
	SnapshotVersion uint16
	Pid             uint32 // the new process (set by RequestHandover)
	Version         string // the new binary's version, for the old one's log
}

func (h HandoverHello) marshal() []byte {
	b := []byte{h.Protocol, h.RecordVersion}
	b = binary.BigEndian.AppendUint16(b, h.SnapshotVersion)
	b = binary.BigEndian.AppendUint32(b, h.Pid)
	return append(b, h.Version...)
}

func parseHello(b []byte) (HandoverHello, error) {
	if len(b) < 8 {
		return HandoverHello{}, errors.New("handover: short HELLO")
	}
	return HandoverHello{Protocol: b[0], RecordVersion: b[1], SnapshotVersion: binary.BigEndian.Uint16(b[2:]),
		Pid: binary.BigEndian.Uint32(b[4:]), Version: string(b[8:])}, nil
}

// PausableListener wraps a listener whose accepts must stop for a while
// without closing it: during a hand-over, the listening socket is shared
// with the new process, which takes it over on commit; until then new
// connections wait in the kernel's backlog, and on a rollback the old
// process accepts them.
type PausableListener struct {
	net.Listener
	dl interface{ SetDeadline(time.Time) error }

	mu       sync.Mutex
	paused   bool
	wake     chan struct{} // closed by Resume
	parked   chan struct{} // signalled when an Accept waits paused
	inAccept int           // Accept calls inside the wrapped listener
	closed   chan struct{}
	once     sync.Once
}

// NewPausableListener wraps l; l must have SetDeadline (a *net.TCPListener
// does) for Pause to interrupt an Accept blocked in it.
func NewPausableListener(l net.Listener) *PausableListener {
	dl, _ := l.(interface{ SetDeadline(time.Time) error })
	return &PausableListener{Listener: l, dl: dl, wake: make(chan struct{}), parked: make(chan struct{}, 1), closed: make(chan struct{})}
}

// Accept waits while the listener is paused.
func (l *PausableListener) Accept() (net.Conn, error) {
	for {
		l.mu.Lock()
		if l.paused {
			wake := l.wake
			l.mu.Unlock()
			select {
			case l.parked <- struct{}{}:
			default:
			}
			select {
			case <-wake:
				continue
			case <-l.closed:
				return nil, net.ErrClosed
			}
		}
		l.inAccept++
		l.mu.Unlock()
		c, err := l.Listener.Accept()
		l.mu.Lock()
		l.inAccept--
		paused := l.paused
		l.mu.Unlock()
		if err != nil && paused && errors.Is(err, os.ErrDeadlineExceeded) {
			continue // Pause interrupted it
		}
		return c, err
	}
}

// Pause stops accepting: it returns once no Accept is inside the wrapped
// listener and one waits paused (so that the connection accepted last has
// been handed on by the accept loop), or after wait.
func (l *PausableListener) Pause(wait time.Duration) error {
	select {
	case <-l.parked: // from an earlier pause
	default:
	}
	l.mu.Lock()
	if !l.paused {
		l.paused = true
		l.wake = make(chan struct{})
	}
	l.mu.Unlock()
	if l.dl != nil {
		l.dl.SetDeadline(time.Unix(1, 0))
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-l.parked:
			l.mu.Lock()
			in := l.inAccept
			l.mu.Unlock()
			if in == 0 {
				return nil
			}
		case <-l.closed:
			return nil
		case <-t.C:
			return fmt.Errorf("listener %s: accept loop did not pause within %v", l.Addr(), wait)
		}
	}
}

// Resume accepts again.
func (l *PausableListener) Resume() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.dl != nil {
		l.dl.SetDeadline(time.Time{})
	}
	if l.paused {
		l.paused = false
		close(l.wake)
	}
}

// Close closes the wrapped listener and wakes a paused Accept.
func (l *PausableListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// SyscallConn lets tableflip pass the socket on.
func (l *PausableListener) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := l.Listener.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

// HandoverBatch is the old process's side of one hand-over: the sessions
// it froze.
type HandoverBatch interface {
	// Records snapshots every session; each record's File is the
	// caller's to close once sent.
	Records() ([]*HandoverRecord, error)
	// Commit forgets the sessions: the new process has them.
	Commit()
	// Rollback thaws them: the old process goes on serving.
	Rollback()
}

// HandoverTaken is the new process's side: the sessions it restored,
// frozen.
type HandoverTaken interface {
	// Start thaws the sessions and splices them (after COMMIT).
	Start()
	// Release forgets them without touching their sockets or peers (no
	// COMMIT: the old process still has them).
	Release()
}

// ErrHandoverRefused is returned to the old process when the new one
// refused the sessions.
var ErrHandoverRefused = errors.New("the new process refused the sessions")

// HandoverResult is what the old process learnt from a hand-over.
type HandoverResult struct {
	Peer     HandoverHello // the new process, as it introduced itself
	Sessions int           // records sent
}

// ServeHandover runs the old process's side of a hand-over on c: it
// waits for the new process's HELLO, freezes (freeze), sends the
// sessions, and commits them if the new process takes them. On any
// failure it rolls back and returns why (errors.Is ErrHandoverRefused
// for a refusal); the sessions are then the old process's again. Each
// wait for the new process is bounded by timeout. nil means committed.
func ServeHandover(c *net.UnixConn, freeze func() (HandoverBatch, error), timeout time.Duration) (HandoverResult, error) {
	h := handoverConn{c}
	var res HandoverResult
	c.SetDeadline(time.Now().Add(timeout))
	typ, p, f, err := h.recv()
	closeFile(f)
	if err != nil {
		return res, fmt.Errorf("waiting for the new process: %w", err)
	}
	if typ != hoHello {
		return res, fmt.Errorf("handover: got message %q, want HELLO", typ)
	}
	hello, err := parseHello(p)
	if err != nil {
		return res, err
	}
	res.Peer = hello
	if hello.Protocol != HandoverProtocol || hello.RecordVersion < HandoverRecordVersion {
		// Nothing frozen yet: it could not read what this one writes.
		err := fmt.Errorf("handover: the new process speaks protocol %d and reads records of version %d; this one speaks %d and writes %d: %w",
			hello.Protocol, hello.RecordVersion, HandoverProtocol, HandoverRecordVersion, ErrRecordVersion)
		h.send(hoAbort, []byte(err.Error()), nil)
		return res, err
	}
	c.SetDeadline(time.Time{})
	batch, err := freeze()
	if err != nil {
		h.send(hoAbort, []byte(err.Error()), nil)
		return res, err
	}
	recs, err := batch.Records()
	if err != nil {
		batch.Rollback()
		h.send(hoAbort, []byte(err.Error()), nil)
		return res, err
	}
	err = sendRecords(h, recs, timeout)
	for _, r := range recs {
		closeFile(r.File)
	}
	res.Sessions = len(recs)
	if err != nil {
		batch.Rollback()
		return res, err
	}
	c.SetDeadline(time.Now().Add(timeout))
	typ, p, f, err = h.recv()
	closeFile(f)
	switch {
	case err != nil:
		batch.Rollback()
		return res, fmt.Errorf("waiting for OK: %w", err)
	case typ == hoRefuse:
		batch.Rollback()
		return res, fmt.Errorf("%w: %s", ErrHandoverRefused, p)
	case typ != hoOK || len(p) != 0:
		batch.Rollback()
		return res, fmt.Errorf("handover: got message %q with %d bytes, want an empty OK", typ, len(p))
	}
	if err := h.send(hoCommit, nil, nil); err != nil {
		batch.Rollback()
		return res, err
	}
	c.SetDeadline(time.Now().Add(timeout))
	typ, _, f, err = h.recv()
	closeFile(f)
	if err == nil && typ == hoDone {
		batch.Commit()
		return res, nil
	}
	// COMMIT sent, no DONE: the new process may be hung. It starts
	// nothing before it writes DONE, so stop it for good, then look once
	// more: a DONE in the socket now means it took the sessions before
	// it died, and they are gone with it.
	if hello.Pid > 0 {
		syscall.Kill(int(hello.Pid), syscall.SIGKILL)
	}
	if err == nil {
		batch.Rollback()
		return res, fmt.Errorf("handover: got message %q, want DONE (new process killed)", typ)
	}
	c.SetDeadline(time.Now().Add(250 * time.Millisecond))
	if t2, _, f2, err2 := h.recv(); err2 == nil && t2 == hoDone {
		closeFile(f2)
		batch.Commit()
		return res, fmt.Errorf("handover: the new process took the sessions, then was killed for answering late: %w", err)
	}
	batch.Rollback()
	return res, fmt.Errorf("waiting for DONE: %w (new process killed)", err)
}

func sendRecords(h handoverConn, recs []*HandoverRecord, timeout time.Duration) error {
	for _, r := range recs {
		b, err := r.MarshalBinary()
		if err != nil {
			h.send(hoAbort, []byte(err.Error()), nil)
			return err
		}
		// A record may be megabytes: the deadline is per record.
		h.c.SetDeadline(time.Now().Add(timeout))
		if err := h.send(hoSession, b, r.File); err != nil {
			return err
		}
	}
	n := binary.BigEndian.AppendUint32(nil, uint32(len(recs)))
	return h.send(hoEnd, n, nil)
}

// RequestHandover runs the new process's side on c: it introduces itself
// (hello), receives the sessions, and has restore rebuild them, frozen;
// a restore error is sent to the old process as the reason of REFUSE (it
// then goes on serving). After OK it waits up to timeout for COMMIT,
// writes DONE, and returns the sessions to start. Without COMMIT it
// releases them and returns an error: the old process still has them.
func RequestHandover(c *net.UnixConn, hello HandoverHello, restore func([]*HandoverRecord) (HandoverTaken, error), timeout time.Duration) (HandoverTaken, int, error) {
	h := handoverConn{c}
	hello.Pid = uint32(os.Getpid())
	c.SetDeadline(time.Now().Add(timeout))
	if err := h.send(hoHello, hello.marshal(), nil); err != nil {
		return nil, 0, err
	}
	var recs []*HandoverRecord
	closeAll := func() {
		for _, r := range recs {
			closeFile(r.File)
		}
	}
	refuse := func(err error) (HandoverTaken, int, error) {
		closeAll()
		h.send(hoRefuse, []byte(err.Error()), nil)
		return nil, 0, fmt.Errorf("refused the sessions: %w", err)
	}
	for {
		// The old process freezes its sessions first: the first record
		// may take as long as its bounded freeze.
		c.SetDeadline(time.Now().Add(2 * timeout))
		typ, p, f, err := h.recv()
		if err != nil {
			closeAll()
			return nil, 0, err
		}
		switch typ {
		case hoSession:
			r, hasFD, err := ParseHandoverRecord(p)
			if err == nil && hasFD != (f != nil) {
				err = fmt.Errorf("handover record: socket expected %v, got %v", hasFD, f != nil)
			}
			if err != nil {
				closeFile(f)
				return refuse(err)
			}
			r.File = f
			recs = append(recs, r)
			continue
		case hoEnd:
			closeFile(f)
			if len(p) != 4 || int(binary.BigEndian.Uint32(p)) != len(recs) {
				return refuse(fmt.Errorf("handover: END does not match the %d records received", len(recs)))
			}
		case hoAbort:
			closeFile(f)
			closeAll()
			return nil, 0, fmt.Errorf("the old process gave up: %s", p)
		default:
			closeFile(f)
			return refuse(fmt.Errorf("handover: unexpected message %q", typ))
		}
		break
	}
	taken, err := restore(recs)
	if err != nil {
		return refuse(err)
	}
	// restore owns the files from here (a socket it used, or closed).
	n := len(recs)
	c.SetDeadline(time.Now().Add(timeout))
	if err := h.send(hoOK, nil, nil); err != nil {
		taken.Release()
		return nil, 0, err
	}
	typ, p, f, err := h.recv()
	closeFile(f)
	if err == nil && (typ != hoCommit || len(p) != 0) {
		// Exactly COMMIT: anything else, even a COMMIT with a payload,
		// is not the old process letting go, and starting would run the
		// sessions twice.
		err = fmt.Errorf("handover: got message %q with %d bytes, want an empty COMMIT", typ, len(p))
	}
	if err == nil {
		err = h.send(hoDone, nil, nil)
	}
	if err != nil {
		taken.Release()
		return nil, 0, fmt.Errorf("no commit: %w", err)
	}
	return taken, n, nil
}
