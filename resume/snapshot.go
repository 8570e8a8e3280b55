package resume

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// Hand-over: a process that is being replaced (an upgrade, a restart)
// freezes its sessions, snapshots them and gives the snapshots, with the
// local sockets, to its successor, which restores them. Links are not
// handed over: the peer sees an outage and the session resumes into the
// new process like after any link failure, so no byte is lost and the
// replay guarantees are those of an ordinary resume. See
// docs/operations.md.

// SnapshotVersion is the format Snapshot writes. A snapshot of another
// version is refused with ErrSnapshotVersion: the old process then keeps
// its sessions.
const SnapshotVersion = 1

var (
	// ErrFrozen is returned by Read, Write, ReadFrom and WriteTo of a
	// frozen session: it is being handed to another process.
	ErrFrozen = errors.New("resume: session frozen for hand-over")
	// ErrSnapshotVersion: a snapshot written in a format this binary does
	// not read.
	ErrSnapshotVersion = errors.New("resume: unsupported snapshot version")
	// errSnapshot is a snapshot that does not decode.
	errSnapshot = errors.New("resume: malformed snapshot")
)

// snapshotMagic starts every snapshot, so that anything else is refused
// before its version is read.
var snapshotMagic = [4]byte{'L', 'L', 'S', 'N'}

// Snapshot sides.
const (
	snapClient = 1
	snapServer = 2
)

// Snapshot flags.
const (
	snapSendShut = 1 << iota
	snapFinAcked
	snapElevated
	snapRecvFin
	snapRecvShut
	snapAckedFin
	snapConfirmed
	snapDelivered
	snapHasPrev
)

// maxSnapshotString bounds a string field (route, addresses).
const maxSnapshotString = 1024

// Freeze stops the session where it is so that another process can take
// it over. Its link is closed without a RESET: the peer sees an outage
// and, from a client, resumes into whichever process holds the session
// next. Its timers stop, and blocked Read, Write, ReadFrom and WriteTo
// return ErrFrozen: ReadFrom keeps what it read, WriteTo consumes exactly
// what it wrote. The caller then stops its own copy loops (a ReadFrom
// blocked in a socket's read returns when the socket's read deadline
// passes) and calls Snapshot.
//
// A session that has ended returns its error; one whose Close is
// lingering, or whose resumption is off (nothing could resume it), cannot
// be frozen: CONFLICT.
func (c *Conn) Freeze() error {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	return s.freeze()
}

// Frozen reports whether the session is frozen.
func (c *Conn) Frozen() bool {
	c.s.mu.Lock()
	defer c.s.unlock()
	return c.s.frozen
}

func (s *session) freeze() error {
	switch {
	case s.frozen:
		return nil
	case s.state == StateClosed:
		return s.errOrClosed()
	case s.localClosed:
		return newError(frame.CodeConflict, s.id, "session is closing")
	case s.reconnectTimeout == 0:
		return newError(frame.CodeConflict, s.id, "resumption is off: the session cannot move to another process")
	}
	s.frozen = true
	if l := s.link; l != nil {
		s.link = nil
		l.close()
		s.downAt = time.Now()
		s.send.elevated = true
	}
	for _, l := range s.retired {
		if l.grace.Stop() {
			l.close()
			s.track(-1)
		}
	}
	s.retired = nil
	if s.expiry != nil {
		s.expiry.Stop()
	}
	if s.recv.ackTimer != nil {
		s.recv.ackTimer.Stop()
		s.recv.ackArmed = false
	}
	if s.cl != nil {
		s.stopRedialWait() // the reconnect loop stops
	}
	s.setState(StateDisconnected, "frozen for hand-over")
	s.wakeReaders()
	s.wakeWriters()
	return nil
}

// Thaw undoes Freeze in this process (a hand-over failed), or starts a
// restored session: a client end redials and resumes, a gateway end
// waits for a RESUME with its reconnect timer running from when its link
// went down. One whose reconnect timeout has passed meanwhile ends with
// TIMEOUT. Thaw on a session that is not frozen does nothing.
func (c *Conn) Thaw() {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	s.thaw()
}

func (s *session) thaw() {
	if !s.frozen || s.state == StateClosed {
		return
	}
	s.frozen = false
	left := s.reconnectTimeout - time.Since(s.downAt)
	if left <= 0 {
		s.expiredOut = true
		s.end(newError(frame.CodeTimeout, s.id, "not resumed within %v (it passed during a hand-over)", s.reconnectTimeout), nil, "reconnect timeout")
		return
	}
	if s.expiry == nil {
		s.expiry = time.AfterFunc(left, s.expired)
	} else {
		s.expiry.Reset(left)
	}
	s.setState(StateDisconnected, "thawed")
	if s.cl != nil {
		s.startRedial()
	}
	if s.gw != nil && !s.gw.delivered {
		// Restored before the proxy had it: deliver it by Accept once
		// its client shows up (or end it, as hello would have).
		s.spawn(func() { s.gw.srv.deliver(s, s.gw.unconfirmedUntil) })
	}
}

// Release forgets a frozen session after another process took it over:
// nothing is sent to anyone, its buffers are dropped, Done is closed and
// a gateway forgets it without a tombstone (the new process answers for
// it). Release on a session that is not frozen does nothing.
func (c *Conn) Release() {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	if !s.frozen || s.state == StateClosed {
		return
	}
	s.localClosed = true
	if s.gw != nil {
		s.gw.noTomb = true
	}
	s.recv.Drop()
	s.end(nil, nil, "handed over to another process")
}

// Snapshot encodes a frozen session: its id, route, credentials and
// resume counter, both buffers with their offsets and flags, the
// negotiated reconnect timeout and when its link went down, and its
// counters. It waits for Read, Write, ReadFrom and WriteTo calls in
// progress to return (Freeze makes them return, except a ReadFrom
// blocked in its source's read: interrupt that first).
func (c *Conn) Snapshot() ([]byte, error) {
	s := c.s
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	defer s.unlock()
	if !s.frozen {
		return nil, newError(frame.CodeConflict, s.id, "snapshot of a session that is not frozen")
	}
	if s.state == StateClosed {
		return nil, s.errOrClosed()
	}
	return s.encode(), nil
}

func (s *session) encode() []byte {
	s.send.unpipe() // a snapshot holds bytes, not a pipe
	b := make([]byte, 0, 256+s.send.Len()+s.recv.Len())
	b = append(b, snapshotMagic[:]...)
	b = binary.BigEndian.AppendUint16(b, SnapshotVersion)
	side := byte(snapClient)
	if s.gw != nil {
		side = snapServer
	}
	b = append(b, side)
	b = append(b, s.id[:]...)
	b = appendString(b, s.route)
	b = appendString(b, s.appAddr)
	b = binary.BigEndian.AppendUint64(b, uint64(s.reconnectTimeout))
	b = binary.BigEndian.AppendUint64(b, uint64(s.downAt.UnixNano()))

	var fl uint16
	set := func(bit uint16, on bool) {
		if on {
			fl |= bit
		}
	}
	set(snapSendShut, s.send.shut)
	set(snapFinAcked, s.send.finAcked)
	set(snapElevated, s.send.elevated)
	set(snapRecvFin, s.recv.fin)
	set(snapRecvShut, s.recv.shut)
	set(snapAckedFin, s.recv.ackedFin)
	if s.gw != nil {
		set(snapConfirmed, isClosed(s.gw.confirmed))
		set(snapDelivered, s.gw.delivered)
		set(snapHasPrev, s.gw.hasPrev)
	}
	b = binary.BigEndian.AppendUint16(b, fl)

	for _, v := range []uint64{s.send.acked, s.send.highest, s.send.window,
		s.recv.finOff, s.recv.window, s.recv.ackedTo, s.recv.ackedWin} {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	if s.cl != nil {
		b = append(b, s.cl.cred[:]...)
		b = binary.BigEndian.AppendUint64(b, s.cl.counter)
	} else {
		b = append(b, s.gw.credCur[:]...)
		b = append(b, s.gw.credPrev[:]...)
		b = binary.BigEndian.AppendUint64(b, s.gw.lastCtr)
		b = appendString(b, s.gw.source)
	}
	st := s.stats
	for _, v := range []uint64{uint64(st.Resumes), uint64(st.LinkFailures), uint64(st.LastOutage), st.BytesReplayed, uint64(st.RTT)} {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	b = appendBuffer(b, &s.send.ReplayBuffer)
	b = appendBuffer(b, &s.recv.ReplayBuffer)
	return b
}

func appendString(b []byte, v string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(v)))
	return append(b, v...)
}

// appendBuffer writes start, length and the bytes held.
func appendBuffer(b []byte, r *ReplayBuffer) []byte {
	b = binary.BigEndian.AppendUint64(b, r.Start())
	b = binary.BigEndian.AppendUint64(b, uint64(r.Len()))
	for _, seg := range r.Slices(nil, r.Start(), r.Len()) {
		b = append(b, seg...)
	}
	return b
}

// snapshotReader decodes, failing once on the first short read.
type snapshotReader struct {
	p   []byte
	err error
}

func (r *snapshotReader) take(n int) []byte {
	if r.err != nil || n < 0 || n > len(r.p) {
		if r.err == nil {
			r.err = fmt.Errorf("%w: truncated", errSnapshot)
		}
		return nil
	}
	v := r.p[:n]
	r.p = r.p[n:]
	return v
}

func (r *snapshotReader) u8() byte {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *snapshotReader) u16() uint16 {
	if v := r.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *snapshotReader) u64() uint64 {
	if v := r.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (r *snapshotReader) str() string {
	n := int(r.u16())
	if n > maxSnapshotString && r.err == nil {
		r.err = fmt.Errorf("%w: string of %d bytes", errSnapshot, n)
	}
	return string(r.take(n))
}

// buffer reads a buffer's offsets and bytes into b (charged to acct).
func (r *snapshotReader) buffer(b *ReplayBuffer) {
	start, n := r.u64(), r.u64()
	if r.err != nil {
		return
	}
	if n > uint64(len(r.p)) || start+n < start {
		r.err = fmt.Errorf("%w: buffer of %d bytes, %d left", errSnapshot, n, len(r.p))
		return
	}
	b.start, b.end, b.base = start, start, start
	b.Write(r.take(int(n)))
}

// decoded is a snapshot's fields before they become a session.
type decoded struct {
	side       byte
	id         SessionID
	route, app string
	reconnect  time.Duration
	downAt     time.Time
	flags      uint16
	// send.acked, send.highest, send.window, recv.finOff, recv.window,
	// recv.ackedTo, recv.ackedWin
	offsets  [7]uint64
	cred     credential // client's, or the gateway's current one
	credPrev credential
	counter  uint64 // client's counter, or the gateway's last one
	source   string
	stats    Stats
	rest     []byte // the two buffers
}

func decodeSnapshot(snap []byte) (*decoded, error) {
	r := &snapshotReader{p: snap}
	if m := r.take(4); m == nil || [4]byte(m) != snapshotMagic {
		return nil, fmt.Errorf("%w: not a lifeline session snapshot", errSnapshot)
	}
	if v := r.u16(); v != SnapshotVersion {
		return nil, fmt.Errorf("%w: version %d, this binary reads %d", ErrSnapshotVersion, v, SnapshotVersion)
	}
	d := &decoded{side: r.u8()}
	if d.side != snapClient && d.side != snapServer {
		return nil, fmt.Errorf("%w: side %d", errSnapshot, d.side)
	}
	copy(d.id[:], r.take(len(d.id)))
	d.route, d.app = r.str(), r.str()
	d.reconnect = time.Duration(r.u64())
	d.downAt = time.Unix(0, int64(r.u64()))
	d.flags = r.u16()
	for i := range d.offsets {
		d.offsets[i] = r.u64()
	}
	copy(d.cred[:], r.take(len(d.cred)))
	if d.side == snapServer {
		copy(d.credPrev[:], r.take(len(d.credPrev)))
		d.counter = r.u64()
		d.source = r.str()
	} else {
		d.counter = r.u64()
	}
	d.stats.Resumes = int(r.u64())
	d.stats.LinkFailures = int(r.u64())
	d.stats.LastOutage = time.Duration(r.u64())
	d.stats.BytesReplayed = r.u64()
	d.stats.RTT = time.Duration(r.u64())
	d.rest = r.p
	if r.err != nil {
		return nil, r.err
	}
	if len(d.route) > frame.MaxRoute {
		return nil, fmt.Errorf("%w: route of %d bytes", errSnapshot, len(d.route))
	}
	if d.reconnect <= 0 {
		return nil, fmt.Errorf("%w: reconnect timeout %v", errSnapshot, d.reconnect)
	}
	return d, nil
}

// build makes a frozen session of d with cfg; the caller sets its
// client or gateway part first (acct is charged for the buffers).
func (d *decoded) build(s *session, acct *Budget) error {
	s.id, s.route, s.appAddr = d.id, d.route, d.app
	s.reconnectTimeout = d.reconnect
	s.downAt = d.downAt
	s.frozen = true
	s.state = StateDisconnected
	s.stats = d.stats
	s.budget = acct
	s.send.acct, s.recv.acct = acct, acct
	has := func(bit uint16) bool { return d.flags&bit != 0 }
	s.send.shut, s.send.finAcked, s.send.elevated = has(snapSendShut), has(snapFinAcked), has(snapElevated)
	s.recv.fin, s.recv.shut, s.recv.ackedFin = has(snapRecvFin), has(snapRecvShut), has(snapAckedFin)
	o := d.offsets
	s.send.acked, s.send.highest, s.send.window = o[0], o[1], o[2]
	s.recv.finOff, s.recv.window, s.recv.ackedTo, s.recv.ackedWin = o[3], o[4], o[5], o[6]

	r := &snapshotReader{p: d.rest}
	r.buffer(&s.send.ReplayBuffer)
	r.buffer(&s.recv.ReplayBuffer)
	if r.err == nil && len(r.p) != 0 {
		r.err = fmt.Errorf("%w: %d bytes after the buffers", errSnapshot, len(r.p))
	}
	if r.err == nil {
		r.err = s.checkRestored()
	}
	if r.err != nil {
		s.send.Drop()
		s.recv.Drop()
		return fmt.Errorf("session %v: %w", s.id, r.err)
	}
	s.send.next = s.send.acked
	return nil
}

// checkRestored rejects offsets no running session could have had, so
// that a corrupt snapshot fails here and not as a gap on the wire.
func (s *session) checkRestored() error {
	t, r := &s.send, &s.recv
	switch {
	case t.acked < t.Start() || t.acked > t.End():
		return fmt.Errorf("%w: acked %d outside the replay buffer [%d, %d)", errSnapshot, t.acked, t.Start(), t.End())
	case t.highest < t.acked || t.highest > t.End():
		return fmt.Errorf("%w: highest sent %d outside [%d, %d]", errSnapshot, t.highest, t.acked, t.End())
	case r.fin && r.finOff != r.End():
		return fmt.Errorf("%w: FIN at %d but %d bytes received", errSnapshot, r.finOff, r.End())
	case r.ackedTo > r.End() || r.window < r.End():
		return fmt.Errorf("%w: receive offsets (acked %d, window %d) inconsistent with %d received", errSnapshot, r.ackedTo, r.window, r.End())
	}
	return nil
}

// Restore rebuilds a client end from a snapshot, frozen: Thaw starts it
// (it redials with dial and resumes). cfg is the new process's settings;
// the negotiated values (reconnect timeout, the peer's window) come from
// the snapshot.
func Restore(snap []byte, dial DialFunc, cfg *Config) (*Conn, error) {
	if cfg == nil {
		cfg = DefaultConfig()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	d, err := decodeSnapshot(snap)
	if err != nil {
		return nil, err
	}
	if d.side != snapClient {
		return nil, fmt.Errorf("%w: a gateway's session given to a client", errSnapshot)
	}
	s := newSession(cfg)
	s.cl = newClientPart(dial)
	s.cl.cred, s.cl.counter = d.cred, d.counter
	if err := d.build(s, cfg.Budget); err != nil {
		return nil, err
	}
	s.setLog(cfg.logger().With("session", s.id.String(), "side", "client"))
	s.lg().Info("session restored", "sent", s.send.End(), "received", s.recv.End(), "buffered", s.send.Len()+s.recv.Len())
	return &Conn{s: s}, nil
}

// Restore rebuilds a gateway end from a snapshot, frozen, and registers
// it: a RESUME for it is served once it is thawed (Thaw, or Server.Thaw).
// A session the proxy had already accepted is not delivered by Accept
// again (the caller restores its upstream); one that had not been is
// delivered once its client shows up, as a new one would be.
func (srv *Server) Restore(snap []byte) (*Conn, error) {
	d, err := decodeSnapshot(snap)
	if err != nil {
		return nil, err
	}
	if d.side != snapServer {
		return nil, fmt.Errorf("%w: a client's session given to a gateway", errSnapshot)
	}
	cfg := srv.cfg.Session
	if srv.cfg.SessionFor != nil {
		if c := srv.cfg.SessionFor(d.route); c != nil {
			cfg = c
		}
	}
	s := newSession(cfg)
	s.gw = &gatewayPart{srv: srv, source: d.source, confirmed: make(chan struct{}),
		credCur: d.cred, credPrev: d.credPrev, hasPrev: d.flags&snapHasPrev != 0, lastCtr: d.counter,
		delivered: d.flags&snapDelivered != 0}
	confirmed := d.flags&snapConfirmed != 0
	if confirmed {
		close(s.gw.confirmed)
	} else {
		// It had its handshake timeout to be confirmed; it gets a new one.
		s.gw.unconfirmedUntil = time.Now().Add(cfg.HandshakeTimeout)
	}
	if err := d.build(s, srv.budget); err != nil {
		return nil, err
	}
	s.setLog(cfg.logger().With("session", s.id.String(), "side", "gateway", "route", s.route))

	srv.mu.Lock()
	switch {
	case srv.isClosed:
		srv.mu.Unlock()
		s.send.Drop()
		s.recv.Drop()
		return nil, ErrServerClosed
	case srv.sessions[s.id] != nil:
		srv.mu.Unlock()
		s.send.Drop()
		s.recv.Drop()
		return nil, newError(frame.CodeConflict, s.id, "session already held here")
	}
	srv.sessions[s.id] = s
	srv.sessWG.Add(1)
	if !confirmed {
		s.gw.unconfirmed = true
		srv.unconfirmed++
		srv.unconfirmedBy[s.gw.source]++
	}
	srv.mu.Unlock()
	s.lg().Info("session restored", "sent", s.send.End(), "received", s.recv.End(),
		"buffered", s.send.Len()+s.recv.Len(), "confirmed", confirmed, "accepted", s.gw.delivered)
	return &Conn{s: s}, nil
}

// Freeze stops the server taking links for a hand-over and freezes every
// session it holds; it returns them. A link that arrives while frozen, or
// whose handshake is in progress, is closed (its client retries, and
// reaches the next process); a HELLO is answered THROTTLED. Serve loops
// keep running: stop them if the listeners go to another process.
func (srv *Server) Freeze() []*Conn {
	srv.mu.Lock()
	srv.frozen = true
	live := srv.liveLocked()
	srv.mu.Unlock()
	out := make([]*Conn, 0, len(live))
	for _, s := range live {
		s.mu.Lock()
		err := s.freeze()
		s.unlock()
		if err == nil {
			out = append(out, &Conn{s: s})
		}
	}
	return out
}

// Thaw undoes Freeze (a hand-over failed) and thaws every session the
// server holds that is still frozen (restored ones included).
func (srv *Server) Thaw() {
	srv.mu.Lock()
	srv.frozen = false
	live := srv.liveLocked()
	srv.mu.Unlock()
	for _, s := range live {
		s.mu.Lock()
		s.thaw()
		s.unlock()
	}
}

// isFrozen reports whether Freeze is in force.
func (srv *Server) isFrozen() bool {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.frozen
}
