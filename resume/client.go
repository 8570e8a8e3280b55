package resume

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// DialFunc opens a new link to the gateway: a TCP or TLS connection, a
// QUIC stream wrapped as a net.Conn, or anything else that carries bytes in
// order. Close must unblock a pending Read and Write.
type DialFunc func(ctx context.Context) (net.Conn, error)

var errKilled = errors.New("link killed")

// redialSummaryEvery is how often a reconnecting session logs a summary
// line at info (every attempt is logged at debug).
const redialSummaryEvery = 30 * time.Second

// Dial opens a new session on route through links made by dial. It
// returns when the gateway has answered WELCOME, or with an *Error when it
// answered REJECT.
func Dial(ctx context.Context, dial DialFunc, route string, cfg *Config) (*Conn, error) {
	return DialWith(ctx, dial, route, DialOptions{}, cfg)
}

// DialWith is Dial with per-session options.
func DialWith(ctx context.Context, dial DialFunc, route string, opts DialOptions, cfg *Config) (*Conn, error) {
	if cfg == nil {
		cfg = DefaultConfig()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(route) > frame.MaxRoute {
		return nil, fmt.Errorf("resume: route name longer than %d bytes", frame.MaxRoute)
	}
	app, err := parseAppAddr(opts.AppAddr)
	if err != nil {
		return nil, fmt.Errorf("resume: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
	defer cancel()
	h, err := hello(ctx, dial, route, app, cfg)
	if err != nil {
		return nil, err
	}

	s := newSession(cfg)
	s.cl = newClientPart(dial)
	s.id = h.welcome.SessionID
	s.route = route
	s.appAddr = app
	s.setLog(cfg.logger().With("session", s.id.String(), "side", "client"))
	s.cl.cred = h.cred
	s.budget = cfg.Budget
	s.send.acct, s.recv.acct = cfg.Budget, cfg.Budget
	s.reconnectTimeout = time.Duration(h.welcome.ReconnectTimeout) * time.Millisecond
	s.recv.window = uint64(cfg.BufferSize)
	l := newLink(s, h.conn, h.fr, 0)
	s.mu.Lock()
	s.attach(l, 0, uint64(h.welcome.Buffer), 0, s.recv.window, false)
	// A first PING tells the gateway we have the session (it parks only
	// confirmed sessions) and measures the RTT.
	l.pingDue = true
	l.start()
	s.unlock()
	return &Conn{s: s}, nil
}

// welcomed is a link on which HELLO got WELCOME: a new session.
type welcomed struct {
	conn    net.Conn
	fr      *frame.Reader
	welcome *frame.Welcome
	cred    credential
}

// hello dials a link and runs HELLO/WELCOME on it within ctx: a new
// session, for Dial and for a session the gateway never started.
func hello(ctx context.Context, dial DialFunc, route, app string, cfg *Config) (*welcomed, error) {
	conn, err := dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("resume: dial: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	priv, pub, err := newKey()
	if err != nil {
		return nil, err
	}
	msg := &frame.Hello{
		Key:              pub,
		ReconnectTimeout: uint32(cfg.ReconnectTimeout / time.Millisecond),
		Buffer:           uint32(cfg.BufferSize),
		Route:            route,
		App:              app,
	}
	b := frame.AppendPreamble(nil)
	b, _ = frame.AppendHello(b, msg)
	if _, err := conn.Write(b); err != nil {
		return nil, fmt.Errorf("resume: send HELLO: %w", err)
	}
	fr := frame.NewReader(conn, linkReadBuffer)
	h, p, err := readHandshake(fr)
	if err != nil {
		return nil, fmt.Errorf("resume: await WELCOME: %w", ctxErr(ctx, err))
	}
	switch h.Type {
	case frame.TypeReject:
		return nil, rejectError(p, SessionID{})
	case frame.TypeWelcome:
	default:
		return nil, fmt.Errorf("resume: %w: %v instead of WELCOME", ErrValidation, h.Type)
	}
	w, err := frame.ParseWelcome(p)
	if err != nil {
		return nil, err
	}
	if w.Buffer < frame.MaxPayload {
		return nil, fmt.Errorf("resume: %w: WELCOME buffer %d below the minimum of %d", ErrValidation, w.Buffer, frame.MaxPayload)
	}
	secret, err := shared(priv, w.Key)
	if err != nil {
		return nil, fmt.Errorf("resume: bad gateway key: %w", err)
	}
	binding, err := linkBinding(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("resume: %w", err)
	}
	stop()
	conn.SetDeadline(time.Time{})
	ok = true
	return &welcomed{conn: conn, fr: fr, welcome: w,
		cred: initialCredential(secret, SessionID(w.SessionID), pub, w.Key, binding)}, nil
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ErrTimeout, err)
	}
	return err
}

// readHandshake reads one handshake frame.
func readHandshake(fr *frame.Reader) (frame.Header, []byte, error) {
	h, err := fr.Next()
	if err != nil {
		return h, nil, err
	}
	if !h.Type.Handshake() {
		return h, nil, fmt.Errorf("%w: %v during handshake", ErrValidation, h.Type)
	}
	p, err := fr.Payload(h)
	return h, p, err
}

func rejectError(p []byte, sid SessionID) error {
	r, err := frame.ParseReject(p)
	if err != nil {
		return err
	}
	return &Error{Code: r.Code, Reason: r.Reason, Remote: true, Session: sid, RetryAfter: r.RetryAfter}
}

// redirect makes every later link of the session go to addr (a GOAWAY
// that names another gateway address). Caller holds mu.
func (c *clientPart) redirect(dialAddr func(context.Context, string) (net.Conn, error), addr string) {
	c.dial = func(ctx context.Context) (net.Conn, error) { return dialAddr(ctx, addr) }
}

// startRedial runs the reconnect loop if it is not running. Caller holds mu.
func (s *session) startRedial() {
	if s.cl.redial || s.state == StateClosed {
		return
	}
	s.cl.redial = true
	now := time.Now()
	s.scheduleRedial(&redialer{start: now, lastSummary: now})
}

// startMigration dials a new link while the current one still works
// (GOAWAY). Caller holds mu.
func (s *session) startMigration() {
	if s.cl.redial || s.state == StateClosed || s.reconnectTimeout == 0 {
		return
	}
	s.cl.redial = true
	now := time.Now()
	s.scheduleRedial(&redialer{migrate: true, start: now, lastSummary: now})
}

// redialer is a reconnect loop between its attempts: it dials and resumes
// until it succeeds, the session ends, or the reconnect timeout fires
// (the expiry timer ends the session, which stops the loop). Between
// attempts it is only a timer, so a parked client session holds no
// goroutine and no stack; one runs for each attempt's dial and handshake.
type redialer struct {
	migrate    bool
	attempt    int
	retryAfter time.Duration // a THROTTLED gateway's own suggestion
	// A mass outage must not turn into a flood of log lines: the first
	// attempt's transitions and failure are logged at info, later ones
	// at debug, with a summary every redialSummaryEvery.
	start, lastSummary time.Time
	timer              *time.Timer
	// ticket: the attempt waits for a place at the RedialGate (under
	// mu; nil otherwise).
	ticket *redialTicket
	// now: the next attempt goes at once (the gateway just answered, and
	// said to open the session again).
	now bool
}

// scheduleRedial runs r's next attempt after the strategy's delay. The
// pending attempt counts in the session's wait group like a goroutine.
// Caller holds mu.
func (s *session) scheduleRedial(r *redialer) {
	d := max(s.cfg.Strategy.Delay(r.attempt), r.retryAfter)
	now := r.now
	r.now = false
	s.track(1)
	s.cl.waiting = r
	if now || d <= 0 && !(r.migrate && r.attempt > 0) {
		r.timer = nil
		go s.redialDue(r)
		return
	}
	r.timer = time.AfterFunc(max(d, time.Millisecond), func() { s.redialDue(r) })
}

// redialDue runs r's attempt, which is due: here, or once the session's
// RedialGate has a place for it. It holds scheduleRedial's place in the
// wait group until the attempt returns (or the wait is cancelled).
func (s *session) redialDue(r *redialer) {
	g := s.cfg.Redials
	if g == nil {
		defer s.track(-1)
		s.redialAttempt(r)
		return
	}
	run := func() {
		defer s.track(-1)
		defer g.leave()
		s.redialAttempt(r)
	}
	s.mu.Lock()
	if s.cl.waiting != r {
		// Cancelled as it fired: the attempt sees why and returns at
		// once, without a place at the gate.
		s.unlock()
		defer s.track(-1)
		s.redialAttempt(r)
		return
	}
	in, t := g.enter(run)
	r.ticket = t
	s.unlock()
	if in {
		run()
	}
}

// stopRedialWait cancels the reconnect loop's pending attempt, waiting
// for its delay or for a place at the gate: the session ended or is
// frozen (Thaw starts a new loop). An attempt that already runs sees that
// for itself. Caller holds mu.
func (s *session) stopRedialWait() {
	r := s.cl.waiting
	if r == nil {
		return
	}
	s.cl.waiting = nil
	if (r.timer != nil && r.timer.Stop()) || (r.ticket != nil && s.cfg.Redials.cancel(r.ticket)) {
		r.ticket = nil
		s.cl.redial = false
		s.track(-1)
	}
}

// redialAttempt makes one attempt of r and schedules the next one if it
// failed and the session goes on.
func (s *session) redialAttempt(r *redialer) {
	level := slog.LevelDebug
	if r.attempt == 0 {
		level = slog.LevelInfo
	}
	s.mu.Lock()
	if s.cl.waiting == r {
		s.cl.waiting = nil
	}
	r.ticket = nil
	// Frozen: Thaw starts a new loop (it sees redial cleared, under the
	// same lock as this decision).
	if s.state == StateClosed || s.frozen || (!r.migrate && s.link != nil) {
		s.cl.redial = false
		s.unlock()
		return
	}
	if s.link == nil {
		s.setStateAt(level, StateReconnecting, "dialing", "attempt", r.attempt)
	}
	restart := s.cl.restart
	s.unlock()
	var err error
	if restart {
		err = s.restartOnce()
	} else {
		err = s.resumeOnce()
	}
	if err == nil {
		// The success path cleared redial under the lock that attached
		// the link, so a failure right after can start a new loop; clear
		// it here only when the session is over.
		s.mu.Lock()
		if s.state == StateClosed {
			s.cl.redial = false
		}
		s.unlock()
		return
	}
	var re *Error
	fatal := errors.As(err, &re) && re.Remote && !re.Code.Retryable()
	r.retryAfter = 0
	if errors.As(err, &re) && re.Remote && re.Code == frame.CodeThrottled {
		r.retryAfter = re.RetryAfter
	}
	s.mu.Lock()
	switch {
	case s.state == StateClosed:
	case fatal && re.Code == frame.CodeNotStarted && !restart && s.restartable():
		// The gateway dropped the session before it started (our
		// confirming PING was lost to the outage): open it anew.
		s.cl.restart = true
		r.now = true
		s.lg().Info("gateway never started the session; opening it again", "reason", re.Reason)
		if s.link == nil {
			s.setStateAt(level, StateDisconnected, "resume failed", "err", err)
		}
	case fatal && re.Code == frame.CodeNone:
		// The gateway ended the session in order while we were away:
		// it had our CLOSE_WRITE or closed both ways after its own.
		s.end(nil, nil, "peer closed while disconnected")
	case fatal:
		s.end(re, nil, "resume rejected")
	case s.link == nil:
		s.setStateAt(level, StateDisconnected, "resume failed", "err", err)
	}
	if s.state == StateClosed {
		s.cl.redial = false
		s.unlock()
		return
	}
	s.lg().Debug("resume attempt failed", "attempt", r.attempt, "err", err)
	if time.Since(r.lastSummary) >= redialSummaryEvery {
		r.lastSummary = time.Now()
		s.lg().Info("still reconnecting", "attempts", r.attempt+1, "for", time.Since(r.start).Round(time.Second), "last_err", err)
	}
	r.attempt++
	s.scheduleRedial(r)
	s.unlock()
}

// restartable reports whether the session can be opened anew on a
// gateway that never started it: nothing came from the gateway and none
// of our bytes was ever acknowledged (the replay buffer still holds the
// stream from byte 0). Caller holds mu.
func (s *session) restartable() bool {
	return s.cl != nil && s.recv.End() == 0 && !s.recv.fin && s.send.acked == 0 && s.send.Start() == 0
}

// restartOnce opens the session again with HELLO on a new link, for a
// session that the gateway ended before its client confirmed it
// (NOT_STARTED): no upstream was dialed and no byte went either way, so
// the new gateway session gets the whole stream from the replay buffer
// and the application sees only a pause. The session takes the new ID.
func (s *session) restartOnce() error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HandshakeTimeout)
	defer cancel()
	s.mu.Lock()
	dial, route, app := s.cl.dial, s.route, s.appAddr
	s.unlock()
	h, err := hello(ctx, dial, route, app, s.cfg)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.unlock()
	if s.state == StateClosed || s.frozen || !s.restartable() {
		// The gateway's new session ends unconfirmed, as NOT_STARTED.
		closeRaw(h.conn)
		return ErrConnClosed
	}
	prev := s.id
	s.id = h.welcome.SessionID
	s.setLog(s.cfg.logger().With("session", s.id.String(), "side", "client"))
	s.cl.cred, s.cl.counter, s.cl.restart = h.cred, 0, false
	s.cl.redial = false // as after a resume: a later failure starts a new loop
	s.reconnectTimeout = time.Duration(h.welcome.ReconnectTimeout) * time.Millisecond
	s.lg().Info("session restarted", "previous", prev.String(), "replay", s.send.End())
	l := newLink(s, h.conn, h.fr, 0)
	s.attach(l, 0, uint64(h.welcome.Buffer), 0, s.recv.window, true)
	l.pingDue = true
	l.start()
	return nil
}

// sendResetOnNewLink tells the gateway that a session aborted while it had
// no link: one RESUME, then RESET, best effort within HandshakeTimeout.
func (s *session) sendResetOnNewLink(reset frame.CodeReason) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HandshakeTimeout)
	defer cancel()
	var conn net.Conn
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if conn, _, err = s.resumeHandshake(ctx, true); err == nil {
			break
		}
		var re *Error
		if errors.As(err, &re) && re.Remote || ctx.Err() != nil {
			break // the gateway answered (the session is gone) or time is up
		}
	}
	if err != nil {
		s.lg().Info("could not deliver RESET to the gateway; it ends the session at its reconnect timeout", "err", err)
		return
	}
	s.lingerReset(conn, reset)
}

// lingerReset writes RESET and waits (up to LivenessTimeout) for the
// gateway to close the link, reading and dropping what it sends meanwhile.
// Closing at once could turn into a TCP RST (we have unread data), and an
// RST makes the peer's kernel drop our RESET unread.
func (s *session) lingerReset(conn net.Conn, reset frame.CodeReason) {
	defer conn.Close()
	conn.SetWriteDeadline(time.Now().Add(finalWriteTimeout))
	if _, err := conn.Write(frame.AppendCodeReason(nil, frame.TypeReset, reset.Code, reset.Reason)); err != nil {
		return
	}
	conn.SetReadDeadline(time.Now().Add(s.cfg.LivenessTimeout))
	io.Copy(io.Discard, conn)
}

// resumeOnce dials one link and runs the RESUME handshake on it.
func (s *session) resumeOnce() error {
	// Not tied to the session's end: a handshake that the gateway may already
	// have accepted must finish even if the session aborts meanwhile, so
	// that attachResumed can deliver the RESET on it.
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HandshakeTimeout)
	defer cancel()
	conn, attach, err := s.resumeHandshake(ctx, false)
	if err != nil {
		return err
	}
	return attach(conn)
}

// resumeHandshake dials a link and runs RESUME/RESUMED on it. It returns
// the link and a function that attaches it (under mu). ended allows it on a
// session that is already CLOSED (to deliver a RESET).
func (s *session) resumeHandshake(ctx context.Context, ended bool) (net.Conn, func(net.Conn) error, error) {
	conn, err := s.cl.dial(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("dial: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()

	binding, err := linkBinding(ctx, conn)
	if err != nil {
		return nil, nil, err
	}
	priv, pub, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	if s.state == StateClosed && !ended {
		s.unlock()
		return nil, nil, ErrConnClosed
	}
	s.cl.counter++
	fl := uint8(0)
	if s.recv.fin {
		fl = frame.AckFin
	}
	r := &frame.Resume{SessionID: s.id, Counter: s.cl.counter, Key: pub,
		Received: s.recv.End(), Window: s.recv.window, Flags: fl}
	cred := s.cl.cred
	s.unlock()
	r.Proof = cred.resumeProof(r, binding)

	b := frame.AppendResume(frame.AppendPreamble(nil), r)
	if _, err := conn.Write(b); err != nil {
		return nil, nil, fmt.Errorf("send RESUME: %w", err)
	}
	fr := frame.NewReader(conn, linkReadBuffer)
	h, p, err := readHandshake(fr)
	if err != nil {
		return nil, nil, fmt.Errorf("await RESUMED: %w", ctxErr(ctx, err))
	}
	if h.Type == frame.TypeReject {
		return nil, nil, rejectError(p, s.id)
	}
	if h.Type != frame.TypeResumed {
		return nil, nil, fmt.Errorf("%w: %v instead of RESUMED", ErrValidation, h.Type)
	}
	d, err := frame.ParseResumed(p)
	if err != nil {
		return nil, nil, err
	}
	if !verify(cred.resumedProof(r, d, binding), d.Proof) {
		// Not the gateway that holds our session: keep trying.
		return nil, nil, newError(frame.CodeAccessDenied, s.id, "RESUMED proof does not verify")
	}
	secret, err := shared(priv, d.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("bad gateway key: %w", err)
	}
	stop()
	conn.SetDeadline(time.Time{})
	ok = true
	return conn, func(conn net.Conn) error { return s.attachResumed(conn, fr, r, d, cred, secret) }, nil
}

// attachResumed splices a link that completed RESUME/RESUMED into the
// session, or resets the session if the gateway lacks bytes we need.
func (s *session) attachResumed(conn net.Conn, fr *frame.Reader, r *frame.Resume, d *frame.Resumed, cred credential, secret []byte) error {
	s.mu.Lock()
	defer s.unlock()
	if s.state == StateClosed {
		if s.finalReset != nil {
			// Aborted while this resume was in flight: the gateway has
			// just attached this link (and dropped the one our RESET may
			// have gone out on), so say it here too.
			reset := *s.finalReset
			s.spawn(func() { s.lingerReset(conn, reset) })
			return ErrConnClosed
		}
		closeRaw(conn) // under mu: no TLS close_notify write
		return ErrConnClosed
	}
	if s.frozen {
		// Frozen while this resume was in flight: the gateway attached the
		// link and sees it close; the next process resumes with the
		// credential it had (the gateway still accepts it as the previous
		// one) and a higher counter.
		closeRaw(conn)
		return ErrFrozen
	}
	s.cl.cred = cred.rotate(secret, s.id, r.Counter)
	perr := s.checkResumePoint(d.Received)
	if perr == nil && (d.Resend < r.Received || d.Resend > s.recv.End()) {
		// It may start above what we asked for (we acknowledged more on
		// the old link meanwhile), never above what we have.
		perr = newError(frame.CodeValidation, s.id, "RESUMED resends from %d: we asked from %d and hold up to %d",
			d.Resend, r.Received, s.recv.End())
	}
	if perr != nil {
		l := newLink(s, conn, fr, d.Resend)
		s.link = l // so end() sends the RESET on it
		l.started = true
		l.startWriter(nil)
		l.kick()
		s.abort(perr.Code, perr.Reason)
		return nil
	}
	l := newLink(s, conn, fr, d.Resend)
	s.cl.redial = false
	s.attach(l, d.Received, d.Window, d.Flags, r.Window, true)
	l.start()
	s.lg().Info("session resumed", "outage", s.stats.LastOutage, "replayed", s.stats.BytesReplayed)
	return nil
}
