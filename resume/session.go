package resume

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
)

// session is the engine behind a Conn: two byte streams with replay
// buffers, and at most one link at a time. Everything under mu; the link
// goroutines take mu for bookkeeping and never hold it across I/O.
type session struct {
	cfg *Config
	// log is atomic: a client session that restarts (NOT_STARTED) takes
	// the new session ID into its logger while callbacks that run after
	// mu is released may be logging.
	log   atomic.Pointer[slog.Logger]
	id    SessionID
	route string
	// appAddr is the application's address ("ip:port") as the client
	// stated it in HELLO; empty when it did not.
	appAddr string

	// reconnectTimeout is the negotiated value (0: no resumption).
	reconnectTimeout time.Duration

	mu sync.Mutex
	// deferred are calls queued under mu, made by unlock after it.
	deferred []func()
	state    State
	// err is why the session ended; nil while it runs and after an
	// orderly end.
	err error

	// The two directions of the stream; see stream.go.
	send sendSide
	recv recvSide

	link *link // attached link, nil while DISCONNECTED
	// retired are links a newer resume replaced, in their grace period.
	retired []*link
	last    *link // most recent link, for addresses and to chain goroutine exits

	// finalReset is the RESET the session ended with, if any. (The flags below
	// are kept together: packed, they keep the session, with its malloc
	// header, within the 768 B size class.)
	finalReset *frame.CodeReason

	// aborted: the session ended abnormally; reads fail at once with err
	// instead of draining the receive buffer.
	aborted bool
	// expiredOut: ended by the reconnect timeout; a later resume is
	// answered NOT_FOUND like any unknown session (no tombstone).
	expiredOut bool

	// finishing: a client that has everything and waits for the gateway
	// to close the link.
	finishing bool

	// localClosed: Close was called; Read/Write fail with ErrConnClosed.
	localClosed bool
	// closeRequested: Close was called and the session ends once our
	// CLOSE_WRITE is acked (RESET NONE tells the peer).
	closeRequested bool

	// frozen: stopped for a hand-over to another process (see
	// snapshot.go): no link, no timers, calls return ErrFrozen.
	frozen bool

	expiry *time.Timer // reconnect timeout while DISCONNECTED

	// rmu serializes Read and WriteTo, wmu Write and ReadFrom: WriteTo
	// writes from the receive buffer and ReadFrom fills the send buffer's
	// tail without holding mu.
	rmu, wmu sync.Mutex

	readWait chan struct{} // closed and cleared when readers may proceed
	sink     *sink         // where DeliverTo writes, if it was called
	// spliceSink: DeliverTo was given a TCP socket, so a tcp link's reader
	// may splice payloads to it (a hint read without mu; link.spliceData
	// decides under it).
	spliceSink atomic.Bool
	writeWait  chan struct{}
	rdl, wdl   deadline

	// done is closed when the session reaches CLOSED; wg counts its
	// goroutines, so Close can wait for them.
	done chan struct{}
	wg   sync.WaitGroup

	stats  Stats
	downAt time.Time // when the last link failed

	// budget, if set, is charged for both buffers; at its limit writers
	// wait (see Budget).
	budget *Budget

	// One of the two is set: the end's own part of the session.
	cl *clientPart
	gw *gatewayPart
}

// clientPart is what only the client end of a session has: the way to dial
// new links, the resume credential and counter, the reconnect loop.
// Guarded by session.mu.
type clientPart struct {
	dial    DialFunc
	cred    credential
	counter uint64
	redial  bool // a reconnect loop is running
	// restart: the gateway never started the session (NOT_STARTED); the
	// reconnect loop opens it again with HELLO instead of RESUME.
	restart bool
	// waiting: the reconnect loop's pending attempt, if it waits.
	waiting *redialer
}

func newClientPart(dial DialFunc) *clientPart {
	return &clientPart{dial: dial}
}

// gatewayPart is what only the gateway end has: its server, the client's
// credentials (the current one and the one before, for a client that
// missed the last RESUMED), the last resume counter, and whether the
// client has shown it holds the session. Guarded by session.mu, except
// unconfirmed (srv.mu).
type gatewayPart struct {
	srv    *Server
	source string // the client's address, for per-source limits
	// confirmed is closed when the client has shown it got WELCOME (its
	// first frame, or a valid resume).
	confirmed chan struct{}
	// unconfirmed: counted among the server's unconfirmed sessions
	// (guarded by srv.mu).
	unconfirmed bool
	// noTomb: ended before the client showed it had the session; nobody
	// will come back for its end code.
	noTomb   bool
	credCur  credential
	credPrev credential
	hasPrev  bool
	lastCtr  uint64
	// delivered: Accept handed the session out (the proxy owns its
	// upstream). A frozen session that was not is delivered by the
	// process that restores it.
	delivered bool
	// unconfirmedUntil: a restored unconfirmed session ends then if its
	// client has not shown up.
	unconfirmedUntil time.Time
}

// Stats are a session's counters.
type Stats struct {
	State         State
	BytesSent     uint64        // bytes written by the application (acked or not): send.End()
	BytesReceived uint64        // bytes received from the peer: recv.End()
	Resumes       int           // successful resumes
	LinkFailures  int           // links lost
	LastOutage    time.Duration // from the last link failure to its resume
	BytesReplayed uint64        // bytes sent again after resumes
	BytesSpliced  uint64        // of BytesReceived, moved from the link to the application with splice(2), not copied
	// BytesSplicedOut: of what the application wrote, sent to the link
	// with splice(2) (one copy, into the replay buffer, instead of two).
	BytesSplicedOut uint64
	RTT             time.Duration // from the last PONG
	Buffered        int           // bytes held in both buffers
	// DownSince is when the link was lost, while the session has none
	// (DISCONNECTED or RECONNECTING); zero otherwise.
	DownSince time.Time
}

func newSession(cfg *Config) *session {
	s := &session{
		cfg:   cfg,
		done:  make(chan struct{}),
		state: StateConnecting,
	}
	return s
}

// setState is the one place a session changes state.
func (s *session) setState(to State, cause string, args ...any) {
	s.setStateAt(slog.LevelInfo, to, cause, args...)
}

// setStateAt is setState with the log line at level (a redial loop's
// repeated transitions go to debug).
func (s *session) setStateAt(level slog.Level, to State, cause string, args ...any) {
	from := s.state
	if from == to {
		return
	}
	s.state = to
	s.after(func() {
		s.lg().Log(context.Background(), level, "session state", append([]any{"from", from.String(), "to", to.String(), "cause", cause}, args...)...)
	})
}

// spawn runs f in a goroutine counted by the session's wait group and, on
// a gateway, by its server's, so that Conn.Close and Server.Close wait for
// it.
func (s *session) spawn(f func()) {
	s.track(1)
	go func() {
		defer s.track(-1)
		f()
	}()
}

// track counts delta goroutines (or timers that act like one) in the
// session's and the server's wait groups.
func (s *session) track(delta int) {
	s.wg.Add(delta)
	if s.gw != nil {
		s.gw.srv.sessWG.Add(delta)
	}
}

// dropRetired forgets a retired link whose grace period is over. Caller
// holds mu.
func (s *session) dropRetired(l *link) {
	for i, r := range s.retired {
		if r == l {
			s.retired = append(s.retired[:i], s.retired[i+1:]...)
			break
		}
	}
	if len(s.retired) == 0 {
		s.retired = nil
	}
}

// after queues f to run once mu is released. Whatever leaves the package
// (a log line, the server's bookkeeping) goes through it, so that the
// session's lock is never held across I/O or another component's lock.
// Caller holds mu.
func (s *session) after(f func()) { s.deferred = append(s.deferred, f) }

// unlock releases mu and runs what was queued under it, in order.
func (s *session) unlock() {
	fs := s.deferred
	s.deferred = nil
	s.mu.Unlock()
	for _, f := range fs {
		f()
	}
}

// sendLimit is the replay buffer limit in force.
func (s *session) sendLimit() int {
	if s.send.elevated {
		return s.cfg.disconnectedLimit()
	}
	return s.cfg.BufferSize
}

// ackThreshold: ACK once this much arrived or was consumed.
func (s *session) ackThreshold() uint64 { return uint64(s.cfg.BufferSize / 4) }

func (s *session) wakeReaders() {
	if s.readWait != nil {
		close(s.readWait)
		s.readWait = nil
	}
	s.kickSink()
}

func (s *session) wakeWriters() {
	if s.writeWait != nil {
		close(s.writeWait)
		s.writeWait = nil
	}
}

func (s *session) readWaiter() chan struct{} {
	if s.readWait == nil {
		s.readWait = make(chan struct{})
	}
	return s.readWait
}

func (s *session) writeWaiter() chan struct{} {
	if s.writeWait == nil {
		s.writeWait = make(chan struct{})
	}
	return s.writeWait
}

// kick tells the current link's writer there may be something to send.
func (s *session) kick() {
	if s.link != nil {
		s.link.kick()
	}
}

// advertise recomputes the receive window after consumption. At an
// exhausted memory budget the window grows by at most one chunk past what
// is held, so the peer cannot make the receive buffer grow much either,
// and each session still makes progress a chunk at a time.
func (s *session) advertise() {
	w := s.recv.Start() + uint64(s.cfg.BufferSize)
	if s.budget.Exhausted() {
		w = min(w, s.recv.End()+chunkSize)
	}
	if w > s.recv.window {
		s.recv.window = w
	}
	if s.recv.window-s.recv.ackedWin >= s.ackThreshold() {
		s.kick()
	}
}

// ackNeeded is evaluated by the writer under mu.
func (s *session) ackNeeded() bool { return s.recv.ackNeeded(s.ackThreshold()) }

func (s *session) armAck() {
	if s.recv.ackArmed || s.state == StateClosed {
		return
	}
	s.recv.ackArmed = true
	if s.recv.ackTimer == nil {
		s.recv.ackTimer = time.AfterFunc(s.cfg.AckDelay, s.ackFired)
	} else {
		s.recv.ackTimer.Reset(s.cfg.AckDelay)
	}
}

func (s *session) ackFired() {
	s.mu.Lock()
	s.recv.ackArmed = false
	s.recv.ackDue = true
	s.kick()
	s.unlock()
}

// onAck applies an ACK from the current link.
func (s *session) onAck(a frame.Ack) error {
	if a.Received > s.send.highest {
		return newError(frame.CodeValidation, s.id, "ACK for %d bytes, only %d ever sent", a.Received, s.send.highest)
	}
	s.send.acked = max(s.send.acked, a.Received)
	if a.Flags&frame.AckFin != 0 {
		// The CLOSE_WRITE may have gone out on an earlier link.
		if !s.send.shut || a.Received != s.send.End() {
			return newError(frame.CodeValidation, s.id, "ACK of a CLOSE_WRITE that was not sent")
		}
		s.send.finAcked = true
	}
	s.releaseSent()
	if a.Window > s.send.window {
		s.send.window = a.Window
		s.kick()
	}
	s.maybeFinish()
	return nil
}

// releaseSent frees what the send side may free and applies the 80%
// rule.
func (s *session) releaseSent() {
	if s.send.release() {
		s.wakeWriters()
	}
	if s.send.elevated && s.link != nil && s.send.Len() <= s.cfg.BufferSize*8/10 {
		s.send.elevated = false
		n := s.send.Len()
		s.after(func() { s.lg().Debug("replay limit back to normal", "buffered", n) })
	}
}

// maybeFinish ends the session when nothing is left to do.
func (s *session) maybeFinish() {
	if s.state == StateClosed || !s.send.shut || !s.send.finAcked {
		return
	}
	switch {
	case s.recv.fin && s.recv.ackedFin && s.cl != nil:
		// The gateway needs our last ACK before it can end. It closes
		// the link when it has it; if the link fails first, we resume
		// and send the ACK again (a gateway that already ended answers
		// REJECT NONE). Ending now could leave it parked until expiry.
		s.finishing = true
	case s.recv.fin && s.recv.ackedFin:
		s.end(nil, nil, "both directions closed")
	case s.recv.fin:
		s.kick() // the writer sends the ACK with AckFin, then we end
	case s.closeRequested:
		s.end(nil, &frame.CodeReason{Code: frame.CodeNone, Reason: "closed"}, "closed")
	}
}

// end moves the session to CLOSED. err nil is an orderly end. If reset is
// set and a link is attached, the writer sends it before closing the link.
// The receive buffer stays readable after an orderly end.
func (s *session) end(err error, reset *frame.CodeReason, cause string) {
	if s.state == StateClosed {
		return
	}
	s.err = err
	s.finalReset = reset
	if err != nil {
		var e *Error
		s.aborted = !errors.As(err, &e) || e.Code != frame.CodeNone
		if s.aborted {
			s.recv.Drop()
		}
	}
	s.send.Drop()
	s.setState(StateClosed, cause, "err", err)
	if s.cl != nil {
		s.stopRedialWait()
	}
	if s.expiry != nil {
		s.expiry.Stop()
	}
	if s.recv.ackTimer != nil {
		s.recv.ackTimer.Stop()
	}
	if l := s.link; l != nil {
		l.finish(reset)
	} else if reset != nil && s.cl != nil && s.state != StateConnecting && s.reconnectTimeout > 0 {
		// No link to carry the RESET: dial one, so that the gateway does
		// not keep the session (and its upstream) parked until it expires.
		r := *reset
		s.spawn(func() { s.sendResetOnNewLink(r) })
	}
	s.link = nil
	for _, l := range s.retired {
		if l.grace.Stop() {
			l.close()
			s.track(-1)
		}
	}
	s.retired = nil
	s.wakeReaders()
	s.wakeWriters()
	close(s.done)
	if s.gw != nil {
		code, reason := endCode(err)
		tomb := s.reconnectTimeout > 0 && !s.expiredOut && !s.gw.noTomb
		s.after(func() { s.gw.srv.ended(s, code, reason, tomb) })
	}
	sent, received, resumes := s.send.End(), s.recv.End(), s.stats.Resumes
	s.after(func() {
		s.lg().Info("session end", "cause", cause, "err", err, "sent", sent, "received", received, "resumes", resumes)
	})
}

// abort ends the session with an error and tells the peer with RESET.
func (s *session) abort(code frame.Code, reason string) {
	err := &Error{Code: code, Reason: reason, Session: s.id}
	s.end(err, &frame.CodeReason{Code: code, Reason: reason}, "abort: "+code.String())
}

// linkFailed is called by a link's goroutines or its liveness timer.
func (s *session) linkFailed(l *link, err error) {
	s.mu.Lock()
	defer s.unlock()
	if l != s.link {
		return
	}
	if s.finishing && peerClosed(err) {
		s.end(nil, nil, "both directions closed")
		return
	}
	var pe *Error
	if errors.As(err, &pe) && pe.Remote && pe.Code == frame.CodeNotStarted && s.restartable() && s.reconnectTimeout > 0 {
		// The gateway ended the session before any frame of ours
		// reached it; nothing went either way: open it again.
		s.cl.restart = true
		s.detach(err)
		return
	}
	if errors.As(err, &pe) {
		// Protocol violation or a peer's RESET: not a link failure.
		if pe.Remote {
			s.end(pe, nil, "peer reset")
		} else {
			s.end(pe, &frame.CodeReason{Code: pe.Code, Reason: pe.Reason}, "protocol error")
		}
		return
	}
	if errors.Is(err, frame.ErrMalformed) {
		s.abort(frame.CodeValidation, err.Error())
		return
	}
	s.detach(err)
}

// detach drops the current link and parks the session (or ends it when
// resumption is off).
func (s *session) detach(cause error) {
	l := s.link
	s.link = nil
	if l != nil {
		l.close()
	}
	s.stats.LinkFailures++
	if s.reconnectTimeout == 0 {
		s.end(newError(frame.CodeTimeout, s.id, "link lost and resumption is disabled: %v", cause), nil, "link lost")
		return
	}
	s.downAt = time.Now()
	// Parked, a session may wait minutes with a few bytes unacknowledged
	// or undelivered: keep those, not the chunks they sit in.
	s.send.Compact()
	s.recv.Compact()
	s.send.elevated = true
	s.wakeWriters() // the larger limit may let a blocked Write go on
	s.setState(StateDisconnected, "link lost", "err", cause)
	if s.expiry == nil {
		s.expiry = time.AfterFunc(s.reconnectTimeout, s.expired)
	} else {
		s.expiry.Reset(s.reconnectTimeout)
	}
	if s.cl != nil {
		s.startRedial()
	}
}

func (s *session) expired() {
	s.mu.Lock()
	defer s.unlock()
	if s.state != StateDisconnected && s.state != StateReconnecting {
		return
	}
	if s.link != nil { // resumed meanwhile
		return
	}
	s.expiredOut = true
	s.end(newError(frame.CodeTimeout, s.id, "not resumed within %v", s.reconnectTimeout), nil, "reconnect timeout")
}

// checkResumePoint validates the peer's Received from a handshake against
// what we hold: above what we ever sent is a lie, below what we still hold
// means the bytes are gone.
func (s *session) checkResumePoint(peerReceived uint64) *Error {
	if peerReceived > s.send.highest {
		return newError(frame.CodeValidation, s.id, "peer claims %d bytes received, only %d ever sent", peerReceived, s.send.highest)
	}
	if peerReceived < s.send.Start() {
		return newError(frame.CodeBufferLost, s.id, "peer needs bytes from %d, replay buffer starts at %d", peerReceived, s.send.Start())
	}
	return nil
}

// attach makes l the session's link after a successful handshake in which
// the peer stated peerReceived, peerWindow and peerFlags. Caller holds mu
// and has checked the resume point.
func (s *session) attach(l *link, peerReceived, peerWindow uint64, peerFlags uint8, ourWindow uint64, resumed bool) {
	if old := s.link; old != nil {
		s.link = nil
		old.close()
	}
	if resumed {
		s.stats.Resumes++
		s.stats.BytesReplayed += s.send.next - min(s.send.next, peerReceived)
		if !s.downAt.IsZero() {
			s.stats.LastOutage = time.Since(s.downAt)
		}
		if h := s.cfg.Hooks; h != nil && h.Resumed != nil {
			outage := s.stats.LastOutage
			s.after(func() { h.Resumed(outage) })
		}
		l.resumedAt = time.Now()
	}
	// Trust the handshake over older ACKs: what the peer lacks is resent.
	s.send.acked = peerReceived
	s.send.next = peerReceived
	s.releaseSent()
	s.send.window = max(s.send.window, peerWindow)
	s.send.finSent = false
	if peerFlags&frame.AckFin != 0 && s.send.shut && peerReceived == s.send.End() {
		s.send.finAcked = true
	}
	// The peer knows what we hold as of the handshake; re-announce the
	// window and FIN state on the new link at the first chance.
	s.recv.ackedTo, s.recv.ackedWin, s.recv.ackedFin = l.rxStart, ourWindow, false
	l.prev = s.last
	s.link, s.last = l, l
	if s.expiry != nil {
		s.expiry.Stop()
	}
	if s.send.Len() <= s.cfg.BufferSize*8/10 {
		s.send.elevated = false
	}
	s.setState(StateActive, map[bool]string{true: "resumed", false: "connected"}[resumed],
		"replay", s.send.End()-peerReceived, "outage", s.stats.LastOutage)
	s.maybeFinish()
}

func (s *session) lg() *slog.Logger      { return s.log.Load() }
func (s *session) setLog(l *slog.Logger) { s.log.Store(l) }

func (s *session) String() string { return fmt.Sprintf("session %v", s.id) }

var _ net.Conn = (*Conn)(nil)

// snapshot is the session's counters, the byte counts derived from the
// buffers' offsets. Caller holds mu.
func (s *session) snapshot() Stats {
	st := s.stats
	st.State = s.state
	st.BytesSent, st.BytesReceived = s.send.End(), s.recv.End()
	st.Buffered = s.send.Len() + s.recv.Len()
	if s.link == nil && (s.state == StateDisconnected || s.state == StateReconnecting) {
		st.DownSince = s.downAt
	}
	return st
}
