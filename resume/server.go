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
	"github.com/lifeline-proxy/lifeline/internal/acceptloop"
)

// ServerConfig configures the gateway side.
type ServerConfig struct {
	// Session settings. Its ReconnectTimeout caps what clients ask for.
	Session *Config
	// SessionFor, if set, returns the settings for sessions on route
	// (Diffusion's per-connector settings, protocol.md §9); nil means
	// Session. Each must have passed Validate.
	SessionFor func(route string) *Config
	// Admit decides whether a HELLO may open a session on route. Return an
	// *Error to choose the REJECT code (NOT_FOUND for an unknown route);
	// any other error is sent as INTERNAL. nil admits everything.
	Admit func(route string, remote net.Addr) error
	// MaxSessions caps live sessions (0: no cap). HELLOs beyond it get
	// REJECT LIMIT; resumes are never refused for it.
	MaxSessions int
	// MemoryBudget caps the bytes held in all sessions' buffers (0: no
	// cap). Growth is charged as it happens: at the budget, sessions stop
	// taking bytes from their upstream (backpressure) instead of growing,
	// and new sessions are refused with LIMIT. See Budget.
	MemoryBudget int64
	// MaxHandshakes bounds handshakes doing their cryptography and
	// bookkeeping at once (a burst of resumes after an outage queues). A
	// slot is held only for that: not while waiting for the first frame,
	// not while a new session waits for its confirmation.
	MaxHandshakes int
	// MaxPendingLinks bounds links that have not yet sent their first
	// handshake frame, in total and per source address. Past a cap the
	// oldest such link is closed, so that silent sockets cannot keep out a
	// client that speaks at once.
	MaxPendingLinks     int
	MaxPendingPerSource int
	// MaxUnconfirmed bounds sessions that got WELCOME but whose client has
	// not yet sent a frame, in total and per source address; HELLOs past
	// a cap get REJECT THROTTLED. An unconfirmed session is ended after
	// HandshakeTimeout.
	MaxUnconfirmed          int
	MaxUnconfirmedPerSource int
	// FailureRate and FailureBurst throttle failed resumes per source IP:
	// past the burst, a source's failing resumes get REJECT THROTTLED
	// until tokens return. A resume with a valid proof is never throttled.
	FailureRate  rate.Limit
	FailureBurst int
	// AcceptBacklog is how many new sessions may wait for Accept.
	AcceptBacklog int
	// OnRefuse, if set, is called for every link or handshake refused,
	// with a short fixed label (see the Refuse* constants) and the REJECT
	// code sent (CodeNone when the link was closed without one). It is
	// called without locks held and must not block.
	OnRefuse func(reason string, code frame.Code)

	// NodeID, when not zero, is written into every new session id (see
	// NodeID): the node's name in a cluster.
	NodeID NodeID
	// Forward, if set (with a non-zero NodeID), is called for a RESUME of
	// a session this gateway does not hold whose id names another node. It
	// runs in the link's handshake goroutine, holding no handshake slot,
	// and must return promptly: nil when it took the link (it then owns
	// f.Conn, relays it to the owner and closes it), or an error to refuse
	// the resume at once: an *Error's code and reason go to the client
	// (NOT_FOUND when the owner is gone); any other error is sent as
	// NOT_FOUND with its text.
	Forward func(f *ForeignResume) error
}

// Refusal labels passed to ServerConfig.OnRefuse.
const (
	RefusePendingFlood     = "pending_flood"      // a link's source (or all sources) had too many links that had not spoken yet
	RefuseHandshakeBusy    = "handshake_busy"     // no handshake slot within the handshake timeout
	RefuseBadPreamble      = "bad_preamble"       // not a lifeline link, or silent until the handshake timeout
	RefuseBadVersion       = "bad_version"        // a protocol version this gateway does not speak
	RefuseBadHandshake     = "bad_handshake"      // a malformed or unexpected handshake frame (REJECT VALIDATION), or a link that failed or went silent inside it (closed: the client may resume)
	RefuseDraining         = "draining"           // new sessions refused while draining
	RefuseMaxSessions      = "max_sessions"       // MaxSessions reached
	RefuseMemoryBudget     = "memory_budget"      // MemoryBudget reached
	RefuseUnconfirmed      = "unconfirmed_limit"  // too many unconfirmed sessions (per source or in total)
	RefuseUnconfirmedTimer = "unconfirmed_expiry" // a session not confirmed within the handshake timeout was ended
	RefuseAdmit            = "admit"              // the Admit hook refused (unknown route, ...)
	RefuseResumeNotFound   = "resume_not_found"   // a resume for an unknown, expired or ended session
	RefuseResumeProof      = "resume_proof"       // a resume whose proof does not verify
	RefuseResumeReplay     = "resume_replay"      // a resume with a counter already used (a replay, or two racing)
	RefuseResumeThrottled  = "resume_throttled"   // a failing resume from a source over its failure budget
	RefuseResumePoint      = "resume_point"       // a resume point the gateway cannot serve (BUFFER_LOST) or that is a lie (VALIDATION)
	RefuseResumeForward    = "resume_forward"     // a resume for another node's session that could not be forwarded to it
	RefuseForwardedHello   = "forwarded_hello"    // a forwarded link that did not carry a RESUME
	RefuseHandover         = "handover"           // a HELLO while the gateway hands its sessions to a new process (THROTTLED: retry)
	RefuseInternal         = "internal"           // key generation or a write failed
)

// DefaultServerConfig returns the gateway defaults.
func DefaultServerConfig() *ServerConfig {
	return &ServerConfig{
		Session:                 DefaultConfig(),
		MaxHandshakes:           256,
		MaxPendingLinks:         4096,
		MaxPendingPerSource:     256,
		MaxUnconfirmed:          1024,
		MaxUnconfirmedPerSource: 64,
		FailureRate:             rate.Every(time.Second),
		FailureBurst:            10,
		AcceptBacklog:           128,
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
	case c.MaxPendingLinks <= 0 || c.MaxPendingPerSource <= 0:
		return errors.New("resume: MaxPendingLinks and MaxPendingPerSource must be positive")
	case c.MaxUnconfirmed <= 0 || c.MaxUnconfirmedPerSource <= 0:
		return errors.New("resume: MaxUnconfirmed and MaxUnconfirmedPerSource must be positive")
	case c.FailureRate <= 0 || c.FailureBurst <= 0:
		return errors.New("resume: FailureRate and FailureBurst must be positive")
	case c.AcceptBacklog < 0:
		return errors.New("resume: AcceptBacklog must not be negative")
	}
	return nil
}

// maxSources bounds the per-source throttle table; maxTombs the table of
// ended sessions kept for their clients.
const (
	maxSources = 16384
	maxTombs   = 65536
)

// maxNotStartedTombs caps the tombstones of sessions that were never
// confirmed, so that a flood of HELLOs leaves the others alone. A
// variable for tests.
var maxNotStartedTombs = 4096

// Server is the gateway side: it accepts links from any source, opens a
// session for each HELLO and splices resumed links into their sessions.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	mu       sync.Mutex
	sessions map[SessionID]*session
	tombs    map[SessionID]*tomb
	// notStarted counts the tombs with CodeNotStarted (capped apart).
	notStarted int
	sources    map[string]*rate.Limiter
	// listeners maps each listener Serve runs on to its accept health.
	listeners map[net.Listener]*acceptloop.State
	draining  bool
	frozen    bool // Freeze: handing over to another process
	isClosed  bool
	// unconfirmed sessions, in total and by source address; reserved:
	// HELLOs admitted but not yet registered as sessions.
	unconfirmed   int
	unconfirmedBy map[string]int
	reserved      int

	pending  pendingLinks
	refusals refusalLog

	accept chan *Conn
	closed chan struct{}
	// closedCtx is cancelled with closed, for waits that take a context.
	closedCtx    context.Context
	cancelClosed context.CancelFunc
	handshk      *semaphore.Weighted // handshakes doing their work
	budget       *Budget
	wg           sync.WaitGroup // serve loops and handshakes
	sessWG       sync.WaitGroup // live sessions and every session goroutine
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
		cfg:           *cfg,
		log:           cfg.Session.logger().With("side", "gateway"),
		sessions:      make(map[SessionID]*session),
		tombs:         make(map[SessionID]*tomb),
		sources:       make(map[string]*rate.Limiter),
		listeners:     make(map[net.Listener]*acceptloop.State),
		unconfirmedBy: make(map[string]int),
		accept:        make(chan *Conn, cfg.AcceptBacklog),
		closed:        make(chan struct{}),
		handshk:       semaphore.NewWeighted(int64(cfg.MaxHandshakes)),
		budget:        NewBudget(cfg.MemoryBudget),
		emptied:       make(chan struct{}, 1),
	}
	srv.pending.init(cfg.MaxPendingLinks, cfg.MaxPendingPerSource)
	srv.refusals.log = srv.log
	srv.closedCtx, srv.cancelClosed = context.WithCancel(context.Background())
	return srv, nil
}

// Accept returns the next new session.
func (srv *Server) Accept() (*Conn, error) {
	for {
		select {
		case c := <-srv.accept:
			s := c.s
			s.mu.Lock()
			if s.frozen {
				// Frozen on its way out: it goes to the next process
				// undelivered, which delivers it there.
				s.unlock()
				continue
			}
			s.gw.delivered = true
			s.unlock()
			return c, nil
		case <-srv.closed:
			return nil, ErrServerClosed
		}
	}
}

// Serve accepts links from l until the server or l is closed, and closes
// l when the server closes (also if it already has). A
// temporary accept failure (descriptor exhaustion) is retried with a
// backoff, logged at most once a second and reported by AcceptErr; any
// other failure is returned (the listener is dead: do not ignore it).
func (srv *Server) Serve(l net.Listener) error {
	srv.mu.Lock()
	if srv.isClosed {
		srv.mu.Unlock()
		l.Close() // Serve owns l, whenever it is called
		return ErrServerClosed
	}
	health := &acceptloop.State{Log: srv.log}
	srv.listeners[l] = health
	srv.wg.Add(1)
	srv.mu.Unlock()
	defer srv.wg.Done()
	for {
		c, err := acceptloop.Accept(l, health, srv.closed)
		if err != nil {
			select {
			case <-srv.closed:
				return ErrServerClosed
			default:
			}
			return err
		}
		srv.wg.Add(1)
		go func() {
			defer srv.wg.Done()
			srv.handshakeLink(c, nil)
		}()
	}
}

// AcceptErr is non-nil while Serve's accepts are failing (for example
// with too many open files), for a health check.
func (srv *Server) AcceptErr() error {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var errs []error
	for _, h := range srv.listeners {
		if err := h.Err(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
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
	srv.handshakeLink(c, nil)
}

// MemoryInUse is the bytes held in all sessions' buffers.
func (srv *Server) MemoryInUse() int64 { return srv.budget.InUse() }

// NumSessions is the number of live sessions, confirmed or not.
func (srv *Server) NumSessions() int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return len(srv.sessions)
}

// Unconfirmed is the number of sessions whose client has not yet shown it
// got WELCOME.
func (srv *Server) Unconfirmed() int {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	return srv.unconfirmed
}

// PendingLinks is the number of links that have not sent a handshake
// frame yet.
func (srv *Server) PendingLinks() int { return srv.pending.len() }

// Sessions returns the live sessions, unconfirmed ones included (their
// Confirmed is false).
func (srv *Server) Sessions() []*Conn {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	out := make([]*Conn, 0, len(srv.sessions))
	for _, s := range srv.sessions {
		out = append(out, &Conn{s: s})
	}
	return out
}

// liveLocked lists the sessions the server holds, for work that must run
// on each without srv.mu (which a session's lock must not be taken under).
// Caller holds srv.mu.
func (srv *Server) liveLocked() []*session {
	live := make([]*session, 0, len(srv.sessions))
	for _, s := range srv.sessions {
		live = append(live, s)
	}
	return live
}

// ResumeFailures counts refused resumes (all codes).
func (srv *Server) ResumeFailures() int64 { return srv.failures.Load() }

// refused counts and logs (rate-limited) one refusal.
func (srv *Server) refused(reason string, code Code, remote net.Addr, msg string, args ...any) {
	if srv.cfg.OnRefuse != nil {
		srv.cfg.OnRefuse(reason, code)
	}
	srv.refusals.warn(reason, msg, append([]any{"remote", remote, "code", code}, args...)...)
}

// handshakeLink reads a link's first frame and opens or resumes its
// session, or forwards it to the node that holds it. fwd is set for a
// link another node forwarded here.
func (srv *Server) handshakeLink(c net.Conn, fwd *forwarded) {
	ctx, cancel := context.WithTimeout(context.Background(), srv.cfg.Session.HandshakeTimeout)
	defer cancel()
	closing := context.AfterFunc(srv.closedCtx, cancel)
	defer closing()
	remote := c.RemoteAddr()
	source := sourceOf(remote)

	// Until its first frame, a link holds no handshake slot (a silent
	// socket must not delay anyone), only a place among the pending links.
	pl, evicted := srv.pending.add(c, source)
	for _, e := range evicted {
		e.Close()
		srv.refused(RefusePendingFlood, frame.CodeNone, e.RemoteAddr(), "link closed: too many links that have not spoken",
			"source", sourceOf(e.RemoteAddr()))
	}
	c.SetDeadline(time.Now().Add(srv.cfg.Session.HandshakeTimeout))
	// Server close ends a handshake at once. Stopped (by endHandshake)
	// before the link's deadline is cleared for the session's use: the
	// context lives on while a new session waits for its confirmation.
	endHandshake := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer endHandshake()
	fr := frame.NewReader(c, linkReadBuffer)
	v, err := fr.ReadPreamble()
	if err != nil {
		if !srv.pending.done(pl) {
			c.Close() // evicted, and counted then
			return
		}
		if errors.Is(err, frame.ErrBadMagic) {
			srv.refused(RefuseBadPreamble, frame.CodeValidation, remote, "link refused", "err", err)
			srv.refuse(c, frame.CodeValidation, "not a lifeline link")
		} else {
			srv.refused(RefuseBadPreamble, frame.CodeNone, remote, "link refused", "err", err)
			c.Close()
		}
		return
	}
	if v != frame.Version {
		srv.pending.done(pl)
		srv.refused(RefuseBadVersion, frame.CodeVersion, remote, "link refused", "version", v)
		srv.refuse(c, frame.CodeVersion, fmt.Sprintf("version %d not supported, this gateway speaks %d", v, frame.Version))
		return
	}
	h, p, err := readHandshake(fr)
	srv.pending.done(pl)
	switch {
	case err == nil:
	case errors.Is(err, frame.ErrMalformed) || errors.Is(err, ErrValidation):
		srv.refused(RefuseBadHandshake, frame.CodeValidation, remote, "link refused", "err", err)
		srv.refuse(c, frame.CodeValidation, err.Error())
		return
	case srv.closedCtx.Err() != nil:
		// Closed under the handshake (shutdown, the end of a hand-over):
		// the client tries again, and reaches whoever serves now. A
		// REJECT here would end its session.
		c.Close()
		return
	default:
		// The link failed or went silent inside its first frame: not a
		// verdict on the session, which the client may resume on its
		// next link (VALIDATION would end it).
		srv.refused(RefuseBadHandshake, frame.CodeNone, remote, "link closed inside its handshake", "err", err)
		c.Close()
		return
	}
	if h.Type != frame.TypeHello && h.Type != frame.TypeResume {
		srv.refused(RefuseBadHandshake, frame.CodeValidation, remote, "link refused", "frame", h.Type)
		srv.refuse(c, frame.CodeValidation, h.Type.String()+" instead of HELLO or RESUME")
		return
	}
	if h.Type == frame.TypeResume && srv.isFrozen() {
		// Handing over: the session may be in the next process already
		// (this one would answer NOT_FOUND). Closing makes the client
		// retry, and reach the process that holds it. (A HELLO is told
		// THROTTLED by hello.)
		c.Close()
		return
	}
	var binding []byte
	if fwd != nil {
		if h.Type != frame.TypeResume {
			srv.refused(RefuseForwardedHello, frame.CodeValidation, remote, "forwarded link refused", "frame", h.Type)
			srv.refuse(c, frame.CodeValidation, "a forwarded link must carry a RESUME")
			return
		}
		binding = fwd.binding
	} else if binding, err = linkBinding(ctx, c); err != nil {
		srv.refused(RefuseBadHandshake, frame.CodeValidation, remote, "link refused", "err", err)
		srv.refuse(c, frame.CodeValidation, err.Error())
		return
	}
	if h.Type == frame.TypeResume && srv.cfg.Forward != nil && fwd == nil {
		// Checked before a handshake slot is taken: forwarding costs this
		// node no cryptography.
		if r, err := frame.ParseResume(p); err == nil {
			endHandshake()
			if srv.forward(c, fr, r, binding, fwd) {
				return
			}
			// Ours after all: the handshake timeout applies again.
			c.SetDeadline(time.Now().Add(srv.cfg.Session.HandshakeTimeout))
			endHandshake = context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
			defer endHandshake()
		}
	}
	if err := srv.handshk.Acquire(ctx, 1); err != nil {
		if srv.closedCtx.Err() != nil {
			c.Close()
			return
		}
		srv.refused(RefuseHandshakeBusy, frame.CodeThrottled, remote, "link refused: too many handshakes in progress")
		srv.refuseRetry(c, frame.CodeThrottled, "too many handshakes in progress", srv.retryBusy())
		return
	}
	if h.Type == frame.TypeHello {
		srv.hello(ctx, c, fr, p, binding, endHandshake) // releases the slot itself
		return
	}
	srv.resume(c, fr, p, binding, endHandshake)
	srv.handshk.Release(1)
}

// refuse sends REJECT and closes the link. A THROTTLED refusal suggests
// when to try again (retryFor).
func (srv *Server) refuse(c net.Conn, code Code, reason string) {
	srv.refuseRetry(c, code, reason, 0)
}

func (srv *Server) refuseRetry(c net.Conn, code Code, reason string, retry time.Duration) {
	c.SetWriteDeadline(time.Now().Add(finalWriteTimeout))
	c.Write(frame.AppendReject(nil, frame.Reject{Code: code, Reason: reason, RetryAfter: retry}))
	c.Close()
}

// Retry delays suggested with REJECT THROTTLED: what frees the resource.
// retryHandover is how soon a HELLO refused during a hand-over should be
// tried again: the new process serves within a moment.
const retryHandover = 100 * time.Millisecond

func (srv *Server) retryBusy() time.Duration {
	return 50 * time.Millisecond // a handshake slot frees in about a handshake's CPU time
}

func (srv *Server) retryUnconfirmed() time.Duration {
	return srv.cfg.Session.HandshakeTimeout // the oldest unconfirmed session is gone by then
}

func (srv *Server) retryFailures() time.Duration {
	srv.mu.Lock()
	r := srv.cfg.FailureRate
	srv.mu.Unlock()
	return time.Duration(float64(time.Second) / float64(r)) // one token
}

// hello opens a session. The caller's handshake slot is released as soon
// as WELCOME is out; the wait for the client's confirmation holds only
// the session's place among the unconfirmed ones.
func (srv *Server) hello(ctx context.Context, c net.Conn, fr *frame.Reader, p []byte, binding []byte, endHandshake func() bool) {
	release := sync.OnceFunc(func() { srv.handshk.Release(1) })
	defer release()
	remote := c.RemoteAddr()
	source := sourceOf(remote)
	hello, err := frame.ParseHello(p)
	if err != nil {
		srv.refused(RefuseBadHandshake, frame.CodeValidation, remote, "session refused", "err", err)
		srv.refuse(c, frame.CodeValidation, err.Error())
		return
	}
	if hello.Buffer < frame.MaxPayload {
		// The peer must accept at least one whole DATA frame, or neither
		// side could ever send one.
		reason := fmt.Sprintf("HELLO buffer %d below the minimum of %d", hello.Buffer, frame.MaxPayload)
		srv.refused(RefuseBadHandshake, frame.CodeValidation, remote, "session refused", "reason", reason)
		srv.refuse(c, frame.CodeValidation, reason)
		return
	}
	app, err := parseAppAddr(hello.App)
	if err != nil {
		srv.refused(RefuseBadHandshake, frame.CodeValidation, remote, "session refused", "err", err)
		srv.refuse(c, frame.CodeValidation, err.Error())
		return
	}
	cfg := srv.cfg.Session
	if srv.cfg.SessionFor != nil {
		if c := srv.cfg.SessionFor(hello.Route); c != nil {
			cfg = c
		}
	}
	// Checked and reserved in one step, so that concurrent HELLOs cannot
	// all pass a cap together. The reservation counts as a session and as
	// an unconfirmed one until the session is registered or refused.
	srv.mu.Lock()
	n, draining, frozen := len(srv.sessions)+srv.reserved, srv.draining, srv.frozen
	unconf, unconfSrc := srv.unconfirmed, srv.unconfirmedBy[source]
	lim := srv.limitsLocked() // SetLimits may change them
	admitted := !draining && !frozen && (lim.MaxSessions == 0 || n < lim.MaxSessions) &&
		unconfSrc < lim.MaxUnconfirmedPerSource && unconf < lim.MaxUnconfirmed
	if admitted {
		srv.reserved++
		srv.unconfirmed++
		srv.unconfirmedBy[source]++
	}
	srv.mu.Unlock()
	registered := false
	unreserve := sync.OnceFunc(func() {
		if !admitted || registered {
			return
		}
		srv.mu.Lock()
		srv.reserved--
		srv.unconfirmedDone(source)
		srv.mu.Unlock()
	})
	defer unreserve()
	// deny frees the reservation before the REJECT goes out: the client
	// may try again the moment it reads it.
	denyRetry := func(code Code, reason string, retry time.Duration) {
		unreserve()
		srv.refuseRetry(c, code, reason, retry)
	}
	deny := func(code Code, reason string) { denyRetry(code, reason, 0) }
	switch {
	case frozen:
		srv.refused(RefuseHandover, frame.CodeThrottled, remote, "session refused: handing over to a new process")
		denyRetry(frame.CodeThrottled, "gateway is handing over to a new process", retryHandover)
		return
	case draining:
		srv.refused(RefuseDraining, frame.CodeShuttingDown, remote, "session refused: draining")
		deny(frame.CodeShuttingDown, "gateway is draining")
		return
	case lim.MaxSessions > 0 && n >= lim.MaxSessions:
		srv.refused(RefuseMaxSessions, frame.CodeLimit, remote, "session refused: max sessions", "max", lim.MaxSessions)
		deny(frame.CodeLimit, fmt.Sprintf("gateway holds its maximum of %d sessions", lim.MaxSessions))
		return
	case srv.budget.Exhausted():
		srv.refused(RefuseMemoryBudget, frame.CodeLimit, remote, "session refused: memory budget", "budget", srv.budget.Limit())
		deny(frame.CodeLimit, "gateway memory budget exhausted")
		return
	case unconfSrc >= lim.MaxUnconfirmedPerSource:
		srv.refused(RefuseUnconfirmed, frame.CodeThrottled, remote, "session refused: too many unconfirmed sessions from this source",
			"max", lim.MaxUnconfirmedPerSource)
		denyRetry(frame.CodeThrottled, "too many unconfirmed sessions from this source", srv.retryUnconfirmed())
		return
	case unconf >= lim.MaxUnconfirmed:
		srv.refused(RefuseUnconfirmed, frame.CodeThrottled, remote, "session refused: too many unconfirmed sessions",
			"max", lim.MaxUnconfirmed)
		denyRetry(frame.CodeThrottled, "too many unconfirmed sessions", srv.retryUnconfirmed())
		return
	case !admitted: // unreachable: the cases above cover every refusal
		deny(frame.CodeInternal, "not admitted")
		return
	}
	if srv.cfg.Admit != nil {
		if err := srv.cfg.Admit(hello.Route, remote); err != nil {
			code, reason := frame.CodeInternal, err.Error()
			var e *Error
			if errors.As(err, &e) {
				code, reason = e.Code, e.Reason
			}
			srv.refused(RefuseAdmit, code, remote, "session refused", "route", hello.Route, "reason", reason)
			deny(code, reason)
			return
		}
	}
	priv, pub, err := newKey()
	if err != nil {
		srv.refused(RefuseInternal, frame.CodeInternal, remote, "session refused: key generation failed", "err", err)
		deny(frame.CodeInternal, "key generation failed")
		return
	}
	secret, err := shared(priv, hello.Key)
	if err != nil {
		srv.refused(RefuseBadHandshake, frame.CodeValidation, remote, "session refused: bad key share", "err", err)
		deny(frame.CodeValidation, "bad key share")
		return
	}
	s := newSession(cfg)
	s.gw = &gatewayPart{srv: srv, source: source, confirmed: make(chan struct{})}
	rand.Read(s.id[:])
	if !srv.cfg.NodeID.IsZero() {
		copy(s.id[nodeOffset:], srv.cfg.NodeID[:])
	}
	s.route = hello.Route
	s.appAddr = app
	s.setLog(cfg.logger().With("session", s.id.String(), "side", "gateway", "route", hello.Route))
	s.gw.credCur = initialCredential(secret, s.id, hello.Key, pub, binding)
	s.reconnectTimeout = min(cfg.ReconnectTimeout, time.Duration(hello.ReconnectTimeout)*time.Millisecond)
	s.recv.window = uint64(cfg.BufferSize)
	s.budget = srv.budget
	s.send.acct, s.recv.acct = srv.budget, srv.budget

	w := &frame.Welcome{SessionID: s.id, Key: pub,
		ReconnectTimeout: uint32(s.reconnectTimeout / time.Millisecond), Buffer: uint32(cfg.BufferSize)}
	l := newLink(s, c, fr, 0)
	s.mu.Lock()
	s.attach(l, 0, uint64(hello.Buffer), 0, s.recv.window, false)
	s.unlock()

	srv.mu.Lock()
	if srv.isClosed {
		srv.mu.Unlock()
		c.Close()
		return
	}
	if srv.frozen {
		srv.mu.Unlock()
		srv.refused(RefuseHandover, frame.CodeThrottled, remote, "session refused: handing over to a new process")
		denyRetry(frame.CodeThrottled, "gateway is handing over to a new process", retryHandover)
		return
	}
	srv.sessions[s.id] = s
	srv.reserved--
	registered = true
	s.gw.unconfirmed = true // the reservation's count is now the session's
	srv.sessWG.Add(1)
	srv.mu.Unlock()

	if _, err := c.Write(frame.AppendWelcome(nil, w)); err != nil {
		s.mu.Lock()
		s.end(newError(frame.CodeInternal, s.id, "send WELCOME: %v", err), nil, "handshake failed")
		s.unlock()
		c.Close()
		return
	}
	release()
	endHandshake()
	c.SetDeadline(time.Time{})
	s.lg().Info("session start", "remote", remote, "reconnect_timeout", s.reconnectTimeout)
	s.startLink(l)

	srv.deliver(s, time.Time{})
}

// deliver hands s out by Accept once its client has shown it got WELCOME
// (its first frame, or a resume), so that no upstream is dialed for a
// session nobody holds. Until then it costs only its own state, and only
// until the handshake deadline (or until, when set): a client whose link
// dropped right after WELCOME may resume within it, later it starts
// over. A session frozen meanwhile is left to the process it goes to.
func (srv *Server) deliver(s *session, until time.Time) {
	if until.IsZero() {
		until = time.Now().Add(s.cfg.HandshakeTimeout)
	}
	wait := time.NewTimer(time.Until(until))
	defer wait.Stop()
	select {
	case <-s.gw.confirmed:
	case <-s.done:
		return
	case <-srv.closed:
		s.mu.Lock()
		if !s.frozen {
			s.abort(frame.CodeShuttingDown, "gateway closed")
		}
		s.unlock()
		return
	case <-wait.C:
		s.mu.Lock()
		switch {
		case s.frozen:
			s.unlock()
			return
		case isClosed(s.gw.confirmed): // confirmed at the deadline
			s.unlock()
		default:
			// Its client may still come back: the PING that confirms
			// it can be lost to an outage that began right after
			// WELCOME. Nothing went either way yet, so the tombstone
			// (NOT_STARTED) tells that client to open the session
			// again rather than reset its application.
			s.abort(frame.CodeNotStarted, "session not confirmed within the handshake timeout; nothing reached the upstream")
			s.unlock()
			srv.refused(RefuseUnconfirmedTimer, frame.CodeNotStarted, nil, "session ended: not confirmed within the handshake timeout",
				"session", s.id.String(), "source", s.gw.source)
			return
		}
	}
	conn := &Conn{s: s}
	t := time.NewTimer(s.cfg.HandshakeTimeout)
	defer t.Stop()
	select {
	case srv.accept <- conn:
	case <-t.C:
		s.mu.Lock()
		if !s.frozen {
			s.abort(frame.CodeLimit, "gateway did not accept the session in time")
		}
		s.unlock()
	case <-srv.closed:
		s.mu.Lock()
		if !s.frozen {
			s.abort(frame.CodeShuttingDown, "gateway closed")
		}
		s.unlock()
	}
}

// startLink starts the goroutines of l, a link whose handshake answer the
// gateway has just written. If the session ended in between (an
// operator's DELETE of a session not yet confirmed, a shutdown), l was
// told to carry the RESET (finish) but its writer never ran: write the
// RESET here and close l, or the client would hear nothing until its
// liveness check gives up on a silent link.
func (s *session) startLink(l *link) {
	s.mu.Lock()
	if s.link == l {
		l.start()
		s.unlock()
		return
	}
	final, reset := !l.started && l.final, l.reset
	s.unlock()
	if !final {
		return // replaced by a newer resume: retire closed it
	}
	if reset != nil {
		l.conn.SetWriteDeadline(time.Now().Add(finalWriteTimeout))
		l.conn.Write(frame.AppendCodeReason(nil, frame.TypeReset, reset.Code, reset.Reason))
	}
	// Not l.close: the session has ended and its Close may be waiting
	// for its goroutines; l.close would start one (markDone).
	closeRaw(l.conn)
}

// confirm marks s confirmed: its client has shown it holds the session.
// Caller holds s.mu.
func (s *session) confirm() {
	if s.gw == nil || isClosed(s.gw.confirmed) {
		return
	}
	close(s.gw.confirmed)
	s.gw.srv.settle(s)
}

// settle takes s off the unconfirmed count, once. Caller holds s.mu.
func (srv *Server) settle(s *session) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !s.gw.unconfirmed {
		return
	}
	s.gw.unconfirmed = false
	srv.unconfirmedDone(s.gw.source)
}

// unconfirmedDone takes one session of source off the unconfirmed counts.
// Caller holds srv.mu.
func (srv *Server) unconfirmedDone(source string) {
	srv.unconfirmed--
	if srv.unconfirmedBy[source]--; srv.unconfirmedBy[source] <= 0 {
		delete(srv.unconfirmedBy, source)
	}
}

func (srv *Server) limiter(remote net.Addr) *rate.Limiter {
	key := sourceOf(remote)
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

// resume splices a link into the session its RESUME names. Failures spend
// the source's failure budget; once it is empty, failing resumes from that
// source are answered THROTTLED. A resume whose proof verifies never
// consults the budget: other peers behind the same address (a NAT, a load
// balancer) cannot lock an owner out of its session.
func (srv *Server) resume(c net.Conn, fr *frame.Reader, p []byte, binding []byte, endHandshake func() bool) {
	remote := c.RemoteAddr()
	fail := func(label string, code Code, format string, args ...any) {
		reason := fmt.Sprintf(format, args...)
		srv.failures.Add(1)
		var retry time.Duration
		if !srv.limiter(remote).Allow() {
			label, code, reason = RefuseResumeThrottled, frame.CodeThrottled, "too many failed resumes from this source"
			retry = srv.retryFailures()
		}
		srv.refused(label, code, remote, "resume refused", "reason", reason)
		srv.refuseRetry(c, code, reason, retry)
	}
	r, err := frame.ParseResume(p)
	if err != nil {
		fail(RefuseBadHandshake, frame.CodeValidation, "%v", err)
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
			if srv.cfg.OnRefuse != nil {
				srv.cfg.OnRefuse(RefuseResumeNotFound, tb.code)
			}
			srv.refuse(c, tb.code, tb.reason)
			return
		}
		fail(RefuseResumeNotFound, frame.CodeNotFound, "no session %v (unknown or expired)", sid)
		return
	}

	s.mu.Lock()
	if s.state == StateClosed {
		// Ended, and not yet off the books (that runs after its lock):
		// answer as its tombstone will, or a client that resumes at once
		// (its link was closed by the end) would read NOT_FOUND for an
		// orderly close.
		tomb := s.reconnectTimeout > 0 && !s.expiredOut && !s.gw.noTomb
		code, reason := endCode(s.err)
		s.unlock()
		if tomb {
			srv.log.Info("resume of an ended session", "session", sid.String(), "code", code)
			if srv.cfg.OnRefuse != nil {
				srv.cfg.OnRefuse(RefuseResumeNotFound, code)
			}
			srv.refuse(c, code, reason)
			return
		}
		fail(RefuseResumeNotFound, frame.CodeNotFound, "session %v has ended", sid)
		return
	}
	if s.frozen {
		// Being handed over: the client retries and reaches the process
		// that holds it next.
		s.unlock()
		c.Close()
		return
	}
	used := s.gw.credCur
	if !verify(used.resumeProof(r, binding), r.Proof) {
		used = s.gw.credPrev
		if !s.gw.hasPrev || !verify(used.resumeProof(r, binding), r.Proof) {
			s.unlock()
			fail(RefuseResumeProof, frame.CodeAccessDenied, "resume proof for session %v does not verify", sid)
			return
		}
	}
	if r.Counter <= s.gw.lastCtr {
		last := s.gw.lastCtr
		s.unlock()
		fail(RefuseResumeReplay, frame.CodeConflict, "resume counter %d not above %d (replayed or raced)", r.Counter, last)
		return
	}
	// RESUME.received may be stale: in a GOAWAY migration the client goes
	// on acknowledging on the old link after it sent RESUME, and those
	// bytes may be freed by now. It has at least what it acknowledged.
	from := max(r.Received, s.send.acked)
	if perr := s.checkResumePoint(from); perr != nil {
		s.abort(perr.Code, perr.Reason)
		s.unlock()
		srv.failures.Add(1)
		srv.refused(RefuseResumePoint, perr.Code, remote, "resume refused", "reason", perr.Reason)
		srv.refuse(c, perr.Code, perr.Reason)
		return
	}
	priv, pub, err := newKey()
	var secret []byte
	if err == nil {
		secret, err = shared(priv, r.Key)
	}
	if err != nil {
		s.unlock()
		fail(RefuseBadHandshake, frame.CodeValidation, "bad key share: %v", err)
		return
	}
	s.gw.lastCtr = r.Counter
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
	d := &frame.Resumed{Key: pub, Received: s.recv.End(), Window: s.recv.window, Resend: from}
	if s.recv.fin {
		d.Flags = frame.AckFin
	}
	d.Proof = used.resumedProof(r, d, binding)
	s.gw.credPrev, s.gw.hasPrev = used, true
	s.gw.credCur = used.rotate(secret, sid, r.Counter)
	s.confirm() // a valid resume proves the client has the session
	s.setState(StateReconnecting, "resume accepted", "remote", remote)
	l := newLink(s, c, fr, d.Received)
	s.attach(l, from, r.Window, r.Flags, d.Window, true)
	stats := s.stats
	s.unlock()

	if _, err := c.Write(frame.AppendResumed(nil, d)); err != nil {
		s.linkFailed(l, err)
		return
	}
	endHandshake()
	c.SetDeadline(time.Time{})
	s.startLink(l)
	s.lg().Info("session resumed", "remote", remote, "outage", stats.LastOutage,
		"replayed", stats.BytesReplayed, "resumes", stats.Resumes)
}

// endCode is the code and reason a session's end is remembered by.
func endCode(err error) (Code, string) {
	var e *Error
	switch {
	case errors.As(err, &e):
		return e.Code, e.Reason
	case err != nil:
		return frame.CodeInternal, err.Error()
	}
	return frame.CodeNone, "session closed"
}

// ended takes a session that reached CLOSED off the server's books and,
// if remember, keeps how it ended for a client that comes back. Called
// after the session's lock is released.
func (srv *Server) ended(s *session, code Code, reason string, remember bool) {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if _, ok := srv.sessions[s.id]; !ok {
		return
	}
	delete(srv.sessions, s.id)
	if s.gw.unconfirmed {
		s.gw.unconfirmed = false
		srv.unconfirmedDone(s.gw.source)
	}
	srv.sessWG.Done() // the registration's; its goroutines count for themselves (spawn)
	if len(srv.sessions) == 0 {
		select {
		case srv.emptied <- struct{}{}:
		default:
		}
	}
	if code == frame.CodeNotStarted && srv.notStarted >= maxNotStartedTombs {
		// A flood of HELLOs that never confirm must not push out the
		// tombstones of real sessions; past the cap such a client gets
		// NOT_FOUND, as it would from a gateway that never saw it.
		remember = false
	}
	if remember && !srv.isClosed {
		if len(srv.tombs) >= maxTombs {
			for id, t := range srv.tombs { // evict one at random
				t.timer.Stop()
				srv.forgetTombLocked(id, t)
				break
			}
		}
		t := &tomb{code: code, reason: reason}
		id := s.id
		t.timer = time.AfterFunc(s.reconnectTimeout, func() {
			srv.mu.Lock()
			if srv.tombs[id] == t {
				srv.forgetTombLocked(id, t)
			}
			srv.mu.Unlock()
		})
		srv.tombs[id] = t
		if code == frame.CodeNotStarted {
			srv.notStarted++
		}
	}
}

// forgetTombLocked drops the tombstone t of id. Caller holds srv.mu.
func (srv *Server) forgetTombLocked(id SessionID, t *tomb) {
	delete(srv.tombs, id)
	if t.code == frame.CodeNotStarted {
		srv.notStarted--
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
	live := srv.liveLocked()
	for _, t := range srv.tombs {
		t.timer.Stop()
	}
	srv.tombs = map[SessionID]*tomb{}
	srv.notStarted = 0
	srv.mu.Unlock()
	for _, s := range live {
		s.mu.Lock()
		s.abort(frame.CodeShuttingDown, "gateway shutting down")
		s.unlock()
	}
	srv.wg.Wait()
	srv.sessWG.Wait()
	return nil
}
