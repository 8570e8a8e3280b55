package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	proxyproto "github.com/pires/go-proxyproto"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/resume"
)

// GatewayConfig configures a Gateway.
type GatewayConfig struct {
	Routes []Route
	// Server holds the session settings and limits (MaxSessions,
	// MemoryBudget, MaxHandshakes). Admit is set by the Gateway.
	Server  *resume.ServerConfig
	Logger  *slog.Logger // nil: discard
	Metrics Metrics      // nil: NopMetrics
	// TrustAppAddr: the clients are trusted to state their
	// application's address (their links are mTLS-authenticated, or the
	// operator vouches for them): a route with ProxyProtocol names it to
	// the upstream instead of the client's own address (appaddr.go).
	TrustAppAddr bool
	// Cluster, if set, makes the gateway a cluster node (docs/cluster.md):
	// its id goes into every session id, resumes of other nodes' sessions
	// are forwarded to them and theirs taken. The Gateway owns it from
	// then on and closes it last, after its sessions.
	Cluster *Cluster
}

// Gateway accepts links, opens a session per HELLO and splices it to a new
// connection to the route's upstream.
type Gateway struct {
	core
	// routes is the route table; Reload replaces it whole. A session
	// reads it when it opens and keeps what it read.
	routes atomic.Pointer[map[string]Route]
	srv    *resume.Server // owns the link listeners: Serve hands them over
	accept sync.WaitGroup // the loop taking sessions from srv
	cl     *Cluster       // nil: standalone

	mu       sync.Mutex
	draining bool
}

// NewGateway validates cfg and returns a Gateway; call Serve with one or
// more link listeners.
func NewGateway(cfg GatewayConfig) (*Gateway, error) {
	routes, err := routeTable(cfg.Routes)
	if err != nil {
		return nil, err
	}
	// Up is what the upstream sent into the session, down what it got.
	g := &Gateway{}
	g.init("gateway", "bytes_from_upstream", "bytes_to_upstream", cfg.Logger, cfg.Metrics)
	sc := resume.DefaultServerConfig()
	if cfg.Server != nil {
		c := *cfg.Server
		sc = &c
	}
	if sc.Session == nil {
		sc.Session = resume.DefaultConfig()
	}
	sc.Session = g.withHooks(sc.Session)
	g.setRoutes(routes)
	sc.SessionFor = func(route string) *resume.Config { r, _ := g.route(route); return r.Session }
	onRefuse := sc.OnRefuse
	sc.OnRefuse = func(reason string, code frame.Code) {
		g.metrics.Refused(reason, code)
		if onRefuse != nil {
			onRefuse(reason, code)
		}
	}
	sc.Admit = func(route string, remote net.Addr) error {
		if _, ok := g.route(route); !ok {
			return &resume.Error{Code: frame.CodeNotFound, Reason: fmt.Sprintf("no route %q on this gateway", route)}
		}
		return nil
	}
	if cfg.Cluster != nil {
		g.cl = cfg.Cluster
		sc.NodeID = g.cl.ID()
		sc.Forward = g.cl.forward
	}
	srv, err := resume.NewServer(sc)
	if err != nil {
		g.abortCancel(shutdownEnd)
		return nil, err
	}
	g.srv = srv
	if g.cl != nil {
		g.cl.SetServe(srv.ServeForwarded)
	}
	g.tracker.failures = srv.ResumeFailures
	g.tracker.unconfirmed = srv.Unconfirmed
	g.tracker.all = srv.Sessions
	g.tracker.appTrusted = cfg.TrustAppAddr
	g.metrics.Track("gateway", g.tracker)
	g.accept.Add(1)
	go g.acceptLoop()
	return g, nil
}

// AcceptErr is non-nil while accepting links fails (descriptor
// exhaustion, retried with a backoff) or a link listener has failed for
// good; /healthz reports it.
func (g *Gateway) AcceptErr() error { return g.srv.AcceptErr() }

// Serve feeds links from l into the gateway until l or the gateway is
// closed. The gateway's session server owns l from then on: it closes l
// when the gateway closes, or at once if the gateway is closed already.
// Accept failures that can pass (descriptor exhaustion) are
// retried with a backoff and reported by AcceptErr; Serve returns nil once
// the gateway is closed, or the error that broke l for good.
func (g *Gateway) Serve(l net.Listener) error {
	err := g.srv.Serve(l)
	if errors.Is(err, resume.ErrServerClosed) {
		return nil
	}
	return err
}

func (g *Gateway) acceptLoop() {
	defer g.accept.Done()
	for {
		conn, err := g.srv.Accept()
		if err != nil {
			return
		}
		g.goSession(func() { g.handle(conn) })
	}
}

func (g *Gateway) handle(conn *resume.Conn) {
	route, ok := g.route(conn.Route())
	if !ok {
		// Admitted, then its route went away in a reload before the
		// session was taken: it never reached an upstream.
		conn.Reset(frame.CodeNotFound, fmt.Sprintf("no route %q on this gateway (removed by a config reload)", conn.Route()))
		g.metrics.SessionEnded("gateway", conn.Route(), causeOf(frame.CodeNotFound))
		g.log.Info("session end", "side", "gateway", "session", conn.SessionID().String(), "route", conn.Route(),
			"cause", causeOf(frame.CodeNotFound), "during", "accept")
		return
	}
	// Tracked from now on, so that the upstream connect can be listed
	// and ended too.
	x := g.track(conn, route.Name, route.Upstream, time.Now())
	log := g.log.With("side", "gateway", "session", conn.SessionID().String(), "route", route.Name)
	select {
	case <-conn.Done():
		// Ended while it waited to be taken (an operator's End): no
		// connection to the upstream for it.
		g.untrack(x)
		cause := "closed"
		if err := conn.Err(); err != nil {
			code, _ := sessionCode(err)
			cause = causeOf(code)
		}
		g.metrics.SessionEnded("gateway", route.Name, cause)
		log.Info("session end", "cause", cause, "err", conn.Err(), "during", "accept")
		return
	default:
	}
	link := conn.RemoteAddr()
	d := net.Dialer{Timeout: route.ConnectTimeout}
	ctx, cancel := context.WithTimeout(x.ctx, route.ConnectTimeout)
	up, err := d.DialContext(ctx, "tcp", route.Upstream)
	cancel()
	if err == nil && route.ProxyProtocol != 0 {
		err = writeProxyHeader(up, g.upstreamSource(conn, link), route.ProxyProtocol)
		if err != nil {
			up.Close()
		}
	}
	if err != nil {
		var ec *endCause
		if errors.As(context.Cause(x.ctx), &ec) {
			// Ended (by an operator, or the gateway closing) while
			// connecting: the upstream never saw the session.
			conn.Reset(ec.code, ec.reason)
			g.untrack(x)
			g.metrics.SessionEnded("gateway", route.Name, ec.cause)
			log.Info("session end", "cause", ec.cause, "err", ec, "during", "upstream connect")
			return
		}
		reason := fmt.Sprintf("upstream %s: %v", route.Upstream, err)
		log.Warn("upstream connect failed", "upstream", route.Upstream, "link", link, "err", err)
		g.metrics.DialFailed("gateway", route.Name)
		g.metrics.SessionEnded("gateway", route.Name, "upstream")
		conn.Reset(frame.CodeUpstream, reason)
		g.untrack(x)
		return
	}
	tcp := up.(*net.TCPConn)
	tcp.SetNoDelay(true)
	log.Info("session start", "link", link, "app_peer", conn.PeerAppAddr(), "upstream", route.Upstream, "upstream_local", tcp.LocalAddr())
	g.splice(tcp, x, log)
}

func writeProxyHeader(up net.Conn, src net.Addr, version int) error {
	if _, ok := src.(*net.TCPAddr); !ok {
		if ua, ok := src.(*net.UDPAddr); ok {
			src = &net.TCPAddr{IP: ua.IP, Port: ua.Port, Zone: ua.Zone}
		} else {
			src = up.LocalAddr()
		}
	}
	h := proxyproto.HeaderProxyFromAddrs(byte(version), src, up.RemoteAddr())
	up.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := h.WriteTo(up)
	up.SetWriteDeadline(time.Time{})
	if err != nil {
		return fmt.Errorf("PROXY header: %w", err)
	}
	return nil
}

// Shutdown drains: new sessions are refused (SHUTTING_DOWN), resumes and
// existing sessions go on until they end or ctx is done; then every
// remaining session is aborted and the listeners close.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	g.draining = true
	g.mu.Unlock()
	err := g.srv.Shutdown(ctx)
	g.forceClose()
	return err
}

// Draining reports whether Shutdown has begun.
func (g *Gateway) Draining() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.draining
}

// Close aborts every session, closes the link listeners and stops the
// gateway.
func (g *Gateway) Close() error {
	g.forceClose()
	return nil
}

// forceClose aborts the splices, closes the session server (and with it
// the link listeners) and waits for every goroutine of the gateway.
func (g *Gateway) forceClose() {
	g.abortCancel(shutdownEnd)
	g.srv.Close()
	if g.cl != nil {
		// After the server: a drain keeps taking forwarded resumes of
		// this node's sessions until they end.
		g.cl.Close()
	}
	g.accept.Wait()
	g.sessions.Wait()
}

// Sessions lists the live sessions, oldest first, those not yet confirmed
// by their client (or not yet taken by the gateway) included, last.
func (g *Gateway) Sessions() []SessionInfo {
	out := g.tracker.Sessions(g.side)
	seen := make(map[string]bool, len(out))
	for _, si := range out {
		seen[si.ID] = true
	}
	now := time.Now()
	for _, conn := range g.srv.Sessions() {
		if id := conn.SessionID().String(); !seen[id] {
			if si := g.untrackedInfo(conn, now); si.State != resume.StateClosed.String() {
				out = append(out, si)
			}
		}
	}
	return out
}

// Session returns the live session id (as Sessions lists it).
func (g *Gateway) Session(id string) (SessionInfo, error) {
	if x := g.tracker.find(id); x != nil {
		return g.tracker.info(g.side, x.conn, x, time.Now()), nil
	}
	if conn := g.untracked(id); conn != nil {
		return g.untrackedInfo(conn, time.Now()), nil
	}
	return SessionInfo{}, fmt.Errorf("%w: %s", ErrNoSession, id)
}

// untracked returns the live session id that the gateway has not taken
// yet (unconfirmed, or waiting in the accept backlog), or nil.
func (g *Gateway) untracked(id string) *resume.Conn {
	for _, conn := range g.srv.Sessions() {
		if conn.SessionID().String() == id {
			return conn
		}
	}
	return nil
}

func (g *Gateway) untrackedInfo(conn *resume.Conn, now time.Time) SessionInfo {
	return g.tracker.info(g.side, conn, &tracked{conn: conn, route: conn.Route(), app: g.upstreamOf(conn.Route())}, now)
}

// End ends session id now, parked or not: the upstream connection gets a
// reset at once, and the client a RESET (a parked session's client gets
// it as the answer to its next RESUME) that resets its application. It
// returns the session as it was ended.
func (g *Gateway) End(id, reason string) (SessionInfo, error) {
	si, err := g.end(id, reason)
	if !errors.Is(err, ErrNoSession) {
		return si, err
	}
	conn := g.untracked(id)
	if conn == nil {
		return SessionInfo{}, err
	}
	// Not spliced yet: no upstream connection to reset.
	ec := adminEnd(reason)
	conn.Reset(ec.code, ec.reason)
	return g.untrackedInfo(conn, time.Now()), nil
}

// GoAway asks the client of session id (as /sessions lists it) to move the
// session to a new link while the current one keeps working
// (docs/protocol.md section 5.6, make-before-break migration). The session
// continues without a gap.
func (g *Gateway) GoAway(id, reason string) error { return g.GoAwayTo(id, "", reason) }

// GoAwayTo is GoAway to another address of this gateway ("host:port"; ""
// for the usual one): the client dials its new link there, and every
// later one. The address must reach this same gateway process, e.g.
// another of its listeners; the gateway cannot check that. A parked
// session, or one with resumption off, cannot move: the error is then a
// *resume.Error with code CONFLICT.
func (g *Gateway) GoAwayTo(id, addr, reason string) error {
	var conn *resume.Conn
	if x := g.tracker.find(id); x != nil {
		conn = x.conn
	} else if conn = g.untracked(id); conn == nil {
		return fmt.Errorf("%w: %s", ErrNoSession, id)
	}
	if addr != "" {
		if err := ValidateHostPort(addr); err != nil {
			return &resume.Error{Code: frame.CodeValidation, Reason: err.Error()}
		}
	}
	if conn.ReconnectTimeout() == 0 {
		return &resume.Error{Code: frame.CodeConflict, Reason: "session " + id + " has resumption off (reconnect timeout 0): it cannot move"}
	}
	if err := conn.GoAwayTo(addr, reason); err != nil {
		var re *resume.Error
		if errors.As(err, &re) && re.Code == frame.CodeConflict {
			return &resume.Error{Code: frame.CodeConflict, Reason: "session " + id + " is " + conn.State().String() +
				": it has no link to send GOAWAY on (its client moves by resuming)"}
		}
		return err
	}
	return nil
}
