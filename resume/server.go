package resume

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"

	"github.com/lifeline-proxy/lifeline/frame"
)

// ServerConfig configures the gateway side.
type ServerConfig struct {
	// Session settings. Its ReconnectTimeout caps what clients ask for.
	Session *Config
	// SessionFor, if set, returns the settings for sessions on route (the
	// seeds' per-connector configuration); nil means Session. Each must
	// have passed Validate.
	SessionFor func(route string) *Config
	// Admit decides whether a HELLO may open a session on route. Return an
	// *Error to choose the REJECT code (NOT_FOUND for an unknown route);
	// any other error is sent as INTERNAL. nil admits everything.
	Admit func(route string, remote net.Addr) error
	// MaxSessions caps live sessions (0: no cap). HELLOs beyond it get
	// REJECT LIMIT; resumes are never refused for it.
	MaxSessions int
	// MemoryBudget caps the bytes held in all sessions' buffers (0: no cap).
	// When it is reached new sessions are refused with LIMIT; existing
	// sessions keep their data (their own limits bound them).
	MemoryBudget int64
	// MaxHandshakes bounds handshakes in progress, so a burst of resumes
	// after an outage queues instead of overwhelming the gateway.
	MaxHandshakes int
	// FailureRate and FailureBurst throttle failed resumes per source IP:
	// past the burst, a source gets REJECT THROTTLED until tokens return.
	FailureRate  rate.Limit
	FailureBurst int
	// AcceptBacklog is how many new sessions may wait for Accept.
	AcceptBacklog int
}

// DefaultServerConfig returns the gateway defaults.
func DefaultServerConfig() *ServerConfig {
	return &ServerConfig{
		Session:       DefaultConfig(),
		MaxHandshakes: 256,
		FailureRate:   rate.Every(time.Second),
		FailureBurst:  10,
		AcceptBacklog: 128,
	}
}

// Validate reports the first setting that cannot work.
func (c *ServerConfig) Validate() error {
	if c == nil {
		return errors.New("resume: nil ServerConfig")
	}
	if err := c.Session.Validate(); err != nil {
		return err
	}
	switch {
	case c.MaxSessions < 0 || c.MemoryBudget < 0:
		return errors.New("resume: MaxSessions and MemoryBudget must not be negative")
	case c.MaxHandshakes <= 0:
		return fmt.Errorf("resume: MaxHandshakes %d must be positive", c.MaxHandshakes)
	case c.FailureRate <= 0 || c.FailureBurst <= 0:
		return errors.New("resume: FailureRate and FailureBurst must be positive")
	case c.AcceptBacklog < 0:
		return errors.New("resume: AcceptBacklog must not be negative")
	}
	return nil
}

// maxSources bounds the per-source throttle table.
const maxSources = 16384

// Server is the gateway side: it accepts links from any source, opens a
// session for each HELLO and splices resumed links into their sessions.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	mu        sync.Mutex
	sessions  map[SessionID]*session
	tombs     map[SessionID]*tomb
	sources   map[string]*rate.Limiter
	listeners map[net.Listener]struct{}
	draining  bool
	isClosed  bool

	accept chan *Conn
	closed chan struct{}
	// closedCtx is cancelled with closed, for waits that take a context.
	closedCtx    context.Context
	cancelClosed context.CancelFunc
	handshk      *semaphore.Weighted // handshakes in progress
	mem          atomic.Int64
	wg           sync.WaitGroup // serve loops and handshakes
	sessWG       sync.WaitGroup // sessions until their goroutines exit
	emptied      chan struct{}  // signalled when the last session ends
	failures     atomic.Int64
}

// tomb remembers how a session ended, for a client that comes back to it.
type tomb struct {
	code   Code
	reason string
	timer  *time.Timer
}

// NewServer returns a Server; call Serve or ServeLink to feed it links and
// Accept to get the sessions.
func NewServer(cfg *ServerConfig) (*Server, error) {
	if cfg == nil {
		cfg = DefaultServerConfig()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	srv := &Server{
		cfg:       *cfg,
		log:       cfg.Session.logger().With("side", "gateway"),
		sessions:  make(map[SessionID]*session),
		tombs:     make(map[SessionID]*tomb),
		sources:   make(map[string]*rate.Limiter),
		listeners: make(map[net.Listener]struct{}),
		accept:    make(chan *Conn, cfg.AcceptBacklog),
		closed:    make(chan struct{}),
		handshk:   semaphore.NewWeighted(int64(cfg.MaxHandshakes)),
		emptied:   make(chan struct{}, 1),
	}
	srv.closedCtx, srv.cancelClosed = context.WithCancel(context.Background())
	return srv, nil
}

// Accept returns the next new session.
func (srv *Server) Accept() (*Conn, error) {
	select {
	case c := <-srv.accept:
		return c, nil
	case <-srv.closed:
		return nil, ErrServerClosed
	}
}

// Serve accepts links from l until the server or l is closed.
func (srv *Server) Serve(l net.Listener) error {
	srv.mu.Lock()
	if srv.isClosed {
		srv.mu.Unlock()
		return ErrServerClosed
	}
	srv.listeners[l] = struct{}{}
	srv.wg.Add(1)
	srv.mu.Unlock()
	defer srv.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			select {
			case <-srv.closed:
				return ErrServerClosed
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		srv.wg.Add(1)
		go func() {
			defer srv.wg.Done()
			srv.handshake(c)
		}()
	}
}

// ServeLink runs the handshake on one link from any transport and returns
// when the link is attached to a session or refused. It takes ownership of
// c.
func (srv *Server) ServeLink(c net.Conn) {
	srv.mu.Lock()
	if srv.isClosed {
		srv.mu.Unlock()
		c.Close()
		return
	}
	srv.wg.Add(1)
	srv.mu.Unlock()
	defer srv.wg.Done()
	srv.handshake(c)
}

// MemoryInUse is the bytes held in all sessions' buffers.
func (srv *Server) MemoryInUse() int64 { return srv.mem.Load() }

// NumSessions is the number of live sessions.
func (srv *Server) NumSessions() int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return len(srv.sessions)
}

// Sessions returns the live sessions.
func (srv *Server) Sessions() []*Conn {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	out := make([]*Conn, 0, len(srv.sessions))
	for _, s := range srv.sessions {
		out = append(out, &Conn{s: s})
	}
	return out
}

// ResumeFailures counts refused resumes (all codes).
func (srv *Server) ResumeFailures() int64 { return srv.failures.Load() }

func (srv *Server) handshake(c net.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), srv.cfg.Session.HandshakeTimeout)
	defer cancel()
	closing := context.AfterFunc(srv.closedCtx, cancel)
	defer closing()
	if err := srv.handshk.Acquire(ctx, 1); err != nil {
		if srv.closedCtx.Err() != nil {
			c.Close()
			return
		}
		srv.refuse(c, frame.CodeThrottled, "too many handshakes in progress")
		return
	}
	defer srv.handshk.Release(1)
	c.SetDeadline(time.Now().Add(srv.cfg.Session.HandshakeTimeout))
	remote := c.RemoteAddr()
	fr := frame.NewReader(c, linkReadBuffer)
	v, err := fr.ReadPreamble()
	if err != nil {
		srv.log.Warn("link refused", "remote", remote, "err", err)
		if errors.Is(err, frame.ErrBadMagic) {
			srv.refuse(c, frame.CodeValidation, "not a lifeline link")
		} else {
			c.Close()
		}
		return
	}
	if v != frame.Version {
		srv.log.Warn("link refused", "remote", remote, "version", v)
		srv.refuse(c, frame.CodeVersion, fmt.Sprintf("version %d not supported, this gateway speaks %d", v, frame.Version))
		return
	}
	h, p, err := readHandshake(fr)
	if err != nil {
		srv.log.Warn("link refused", "remote", remote, "err", err)
		srv.refuse(c, frame.CodeValidation, err.Error())
		return
	}
	switch h.Type {
	case frame.TypeHello:
		srv.hello(c, fr, p)
	case frame.TypeResume:
		srv.resume(c, fr, p)
	default:
		srv.refuse(c, frame.CodeValidation, h.Type.String()+" instead of HELLO or RESUME")
	}
}

// refuse sends REJECT and closes the link.
func (srv *Server) refuse(c net.Conn, code Code, reason string) {
	c.SetWriteDeadline(time.Now().Add(finalWriteTimeout))
	c.Write(frame.AppendCodeReason(nil, frame.TypeReject, code, reason))
	c.Close()
}

func (srv *Server) hello(c net.Conn, fr *frame.Reader, p []byte) {
	remote := c.RemoteAddr()
	hello, err := frame.ParseHello(p)
	if err != nil {
		srv.refuse(c, frame.CodeValidation, err.Error())
		return
	}
	cfg := srv.cfg.Session
	if srv.cfg.SessionFor != nil {
		if c := srv.cfg.SessionFor(hello.Route); c != nil {
			cfg = c
		}
	}
	srv.mu.Lock()
	n, draining := len(srv.sessions), srv.draining
	srv.mu.Unlock()
	switch {
	case draining:
		srv.refuse(c, frame.CodeShuttingDown, "gateway is draining")
		return
	case srv.cfg.MaxSessions > 0 && n >= srv.cfg.MaxSessions:
		srv.log.Warn("session refused", "remote", remote, "reason", "max sessions", "max", srv.cfg.MaxSessions)
		srv.refuse(c, frame.CodeLimit, fmt.Sprintf("gateway holds its maximum of %d sessions", srv.cfg.MaxSessions))
		return
	case srv.cfg.MemoryBudget > 0 && srv.mem.Load() >= srv.cfg.MemoryBudget:
		srv.log.Warn("session refused", "remote", remote, "reason", "memory budget", "budget", srv.cfg.MemoryBudget)
		srv.refuse(c, frame.CodeLimit, "gateway memory budget exhausted")
		return
	}
	if srv.cfg.Admit != nil {
		if err := srv.cfg.Admit(hello.Route, remote); err != nil {
			code, reason := frame.CodeInternal, err.Error()
			var e *Error
			if errors.As(err, &e) {
				code, reason = e.Code, e.Reason
			}
			srv.log.Warn("session refused", "remote", remote, "route", hello.Route, "code", code, "reason", reason)
			srv.refuse(c, code, reason)
			return
		}
	}
	priv, pub, err := newKey()
	if err != nil {
		srv.refuse(c, frame.CodeInternal, "key generation failed")
		return
	}
	secret, err := shared(priv, hello.Key)
	if err != nil {
		srv.refuse(c, frame.CodeValidation, "bad key share")
		return
	}
	s := newSession(cfg, false)
	rand.Read(s.id[:])
	s.srv = srv
	s.route = hello.Route
	s.log = cfg.logger().With("session", s.id.String(), "side", "gateway", "route", hello.Route)
	s.credCur = initialCredential(secret, s.id, hello.Key, pub)
	s.reconnectTimeout = min(cfg.ReconnectTimeout, time.Duration(hello.ReconnectTimeout)*time.Millisecond)
	s.window = uint64(cfg.BufferSize)
	s.send.acct, s.recv.acct = &srv.mem, &srv.mem

	w := &frame.Welcome{SessionID: s.id, Key: pub,
		ReconnectTimeout: uint32(s.reconnectTimeout / time.Millisecond), Buffer: uint32(cfg.BufferSize)}
	l := newLink(s, c, fr, 0)
	s.mu.Lock()
	s.attach(l, 0, uint64(hello.Buffer), 0, s.window, false)
	s.mu.Unlock()

	srv.mu.Lock()
	if srv.isClosed {
		srv.mu.Unlock()
		c.Close()
		return
	}
	srv.sessions[s.id] = s
	srv.sessWG.Add(1)
	srv.mu.Unlock()

	if _, err := c.Write(frame.AppendWelcome(nil, w)); err != nil {
		s.mu.Lock()
		s.end(newError(frame.CodeInternal, s.id, "send WELCOME: %v", err), nil, "handshake failed")
		s.mu.Unlock()
		c.Close()
		return
	}
	c.SetDeadline(time.Time{})
	s.log.Info("session start", "remote", remote, "reconnect_timeout", s.reconnectTimeout)
	s.mu.Lock()
	if s.link == l {
		l.start()
	}
	s.mu.Unlock()

	conn := &Conn{s: s}
	t := time.NewTimer(cfg.HandshakeTimeout)
	defer t.Stop()
	// Hand the session out only once the client has shown it got WELCOME
	// (its first frame, or a resume), so that no upstream is dialed for a
	// session nobody holds. Until then it costs only its own state; if the
	// first link fails it parks like any other session, because a client
	// whose network dropped right after WELCOME will come back.
	select {
	case <-s.confirmed:
	case <-s.done:
		return
	case <-srv.closed:
		s.mu.Lock()
		s.abort(frame.CodeShuttingDown, "gateway closed")
		s.mu.Unlock()
		return
	}
	select {
	case srv.accept <- conn:
	case <-t.C:
		s.mu.Lock()
		s.abort(frame.CodeLimit, "gateway did not accept the session in time")
		s.mu.Unlock()
	case <-srv.closed:
		s.mu.Lock()
		s.abort(frame.CodeShuttingDown, "gateway closed")
		s.mu.Unlock()
	}
}

func (srv *Server) limiter(remote net.Addr) *rate.Limiter {
	key := remote.String()
	if ta, ok := remote.(*net.TCPAddr); ok {
		key = ta.IP.String()
	} else if ua, ok := remote.(*net.UDPAddr); ok {
		key = ua.IP.String()
	} else if h, _, err := net.SplitHostPort(key); err == nil {
		key = h
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	l := srv.sources[key]
	if l == nil {
		if len(srv.sources) >= maxSources {
			for k := range srv.sources { // evict one at random
				delete(srv.sources, k)
				break
			}
		}
		l = rate.NewLimiter(srv.cfg.FailureRate, srv.cfg.FailureBurst)
		srv.sources[key] = l
	}
	return l
}

func (srv *Server) resume(c net.Conn, fr *frame.Reader, p []byte) {
	remote := c.RemoteAddr()
	lim := srv.limiter(remote)
	fail := func(code Code, format string, args ...any) {
		reason := fmt.Sprintf(format, args...)
		srv.failures.Add(1)
		lim.Allow() // spend a token
		srv.log.Warn("resume refused", "remote", remote, "code", code, "reason", reason)
		srv.refuse(c, code, reason)
	}
	if lim.Tokens() < 1 {
		srv.failures.Add(1)
		srv.log.Warn("resume refused", "remote", remote, "code", frame.CodeThrottled)
		srv.refuse(c, frame.CodeThrottled, "too many failed resumes from this source")
		return
	}
	r, err := frame.ParseResume(p)
	if err != nil {
		fail(frame.CodeValidation, "%v", err)
		return
	}
	sid := SessionID(r.SessionID)
	srv.mu.Lock()
	s := srv.sessions[sid]
	tb := srv.tombs[sid]
	srv.mu.Unlock()
	if s == nil {
		if tb != nil {
			srv.log.Info("resume of an ended session", "session", sid.String(), "code", tb.code)
			srv.refuse(c, tb.code, tb.reason)
			return
		}
		fail(frame.CodeNotFound, "no session %v (unknown or expired)", sid)
		return
	}

	s.mu.Lock()
	if s.state == StateClosed {
		s.mu.Unlock()
		fail(frame.CodeNotFound, "session %v has ended", sid)
		return
	}
	used := s.credCur
	if !verify(used.resumeProof(r), r.Proof) {
		used = s.credPrev
		if !s.hasPrev || !verify(used.resumeProof(r), r.Proof) {
			s.mu.Unlock()
			fail(frame.CodeAccessDenied, "resume proof for session %v does not verify", sid)
			return
		}
	}
	if r.Counter <= s.lastCtr {
		last := s.lastCtr
		s.mu.Unlock()
		fail(frame.CodeConflict, "resume counter %d not above %d (replayed or raced)", r.Counter, last)
		return
	}
	if perr := s.checkResumePoint(r.Received); perr != nil {
		s.abort(perr.Code, perr.Reason)
		s.mu.Unlock()
		fail(perr.Code, "%s", perr.Reason)
		return
	}
	priv, pub, err := newKey()
	var secret []byte
	if err == nil {
		secret, err = shared(priv, r.Key)
	}
	if err != nil {
		s.mu.Unlock()
		fail(frame.CodeValidation, "bad key share: %v", err)
		return
	}
	s.lastCtr = r.Counter
	// The old link, if the gateway had not noticed it died, goes now: the
	// newest valid resume wins. Its reader commits nothing after this.
	if old := s.link; old != nil {
		// Close it a little later: in a GOAWAY migration it still works
		// and the client closes it itself once it has our RESUMED; closing
		// it first would look like a link failure to the client.
		s.link = nil
		s.downAt = time.Now()
		old.retire()
	}
	d := &frame.Resumed{Key: pub, Received: s.recv.End(), Window: s.window}
	if s.peerFin {
		d.Flags = frame.AckFin
	}
	d.Proof = used.resumedProof(r, d)
	s.credPrev, s.hasPrev = used, true
	s.credCur = used.rotate(secret, sid, r.Counter)
	if !isClosed(s.confirmed) {
		close(s.confirmed) // a valid resume proves the client has the session
	}
	s.setState(StateReconnecting, "resume accepted", "remote", remote)
	l := newLink(s, c, fr, d.Received)
	s.attach(l, r.Received, r.Window, r.Flags, d.Window, true)
	stats := s.stats
	s.mu.Unlock()

	if _, err := c.Write(frame.AppendResumed(nil, d)); err != nil {
		s.linkFailed(l, err)
		return
	}
	c.SetDeadline(time.Time{})
	s.mu.Lock()
	if s.link == l {
		l.start()
	}
	s.mu.Unlock()
	s.log.Info("session resumed", "remote", remote, "outage", stats.LastOutage,
		"replayed", stats.BytesReplayed, "resumes", stats.Resumes)
}

// ended is called by a session reaching CLOSED, with s.mu held.
func (srv *Server) ended(s *session) {
	code, reason := frame.CodeNone, "session closed"
	var e *Error
	if errors.As(s.err, &e) {
		code, reason = e.Code, e.Reason
	} else if s.err != nil {
		code, reason = frame.CodeInternal, s.err.Error()
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if _, ok := srv.sessions[s.id]; !ok {
		return
	}
	delete(srv.sessions, s.id)
	go func() { s.wg.Wait(); srv.sessWG.Done() }()
	if len(srv.sessions) == 0 {
		select {
		case srv.emptied <- struct{}{}:
		default:
		}
	}
	if s.reconnectTimeout > 0 && !srv.isClosed && !s.expiredOut {
		t := &tomb{code: code, reason: reason}
		id := s.id
		t.timer = time.AfterFunc(s.reconnectTimeout, func() {
			srv.mu.Lock()
			if srv.tombs[id] == t {
				delete(srv.tombs, id)
			}
			srv.mu.Unlock()
		})
		srv.tombs[id] = t
	}
}

// Shutdown drains: new sessions are refused with SHUTTING_DOWN, resumes
// are still served, and it returns when every session has ended or ctx is
// done; then it closes the server, aborting what is left.
func (srv *Server) Shutdown(ctx context.Context) error {
	srv.mu.Lock()
	srv.draining = true
	srv.mu.Unlock()
	for {
		if srv.NumSessions() == 0 {
			return srv.Close()
		}
		select {
		case <-srv.emptied:
		case <-ctx.Done():
			srv.Close()
			return ctx.Err()
		}
	}
}

// Close stops the server: listeners close, every session is aborted with
// SHUTTING_DOWN, and Close returns when all goroutines have exited.
func (srv *Server) Close() error {
	srv.mu.Lock()
	if srv.isClosed {
		srv.mu.Unlock()
		srv.wg.Wait()
		srv.sessWG.Wait()
		return nil
	}
	srv.isClosed = true
	close(srv.closed)
	srv.cancelClosed()
	for l := range srv.listeners {
		l.Close()
	}
	live := make([]*session, 0, len(srv.sessions))
	for _, s := range srv.sessions {
		live = append(live, s)
	}
	for _, t := range srv.tombs {
		t.timer.Stop()
	}
	srv.tombs = map[SessionID]*tomb{}
	srv.mu.Unlock()
	for _, s := range live {
		s.mu.Lock()
		s.abort(frame.CodeShuttingDown, "gateway shutting down")
		s.mu.Unlock()
	}
	srv.wg.Wait()
	srv.sessWG.Wait()
	return nil
}
