package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
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
}

// Gateway accepts links, opens a session per HELLO and splices it to a new
// connection to the route's upstream.
type Gateway struct {
	core
	routes map[string]Route // immutable after NewGateway
	srv    *resume.Server   // owns the link listeners: Serve hands them over
	accept sync.WaitGroup   // the loop taking sessions from srv

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
	g := &Gateway{routes: routes}
	g.init("gateway", "bytes_from_upstream", "bytes_to_upstream", cfg.Logger, cfg.Metrics)
	sc := resume.DefaultServerConfig()
	if cfg.Server != nil {
		c := *cfg.Server
		sc = &c
	}
	if sc.Session == nil {
		sc.Session = resume.DefaultConfig()
	}
	sc.SessionFor = func(route string) *resume.Config { return g.routes[route].Session }
	onRefuse := sc.OnRefuse
	sc.OnRefuse = func(reason string, code frame.Code) {
		g.metrics.Refused(reason)
		if onRefuse != nil {
			onRefuse(reason, code)
		}
	}
	sc.Admit = func(route string, remote net.Addr) error {
		if _, ok := g.routes[route]; !ok {
			return &resume.Error{Code: frame.CodeNotFound, Reason: fmt.Sprintf("no route %q on this gateway", route)}
		}
		return nil
	}
	srv, err := resume.NewServer(sc)
	if err != nil {
		g.abortCancel()
		return nil, err
	}
	g.srv = srv
	g.tracker.failures = srv.ResumeFailures
	g.tracker.unconfirmed = srv.Unconfirmed
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
	route := g.routes[conn.Route()]
	start := time.Now()
	log := g.log.With("side", "gateway", "session", conn.SessionID().String(), "route", route.Name)
	link := conn.RemoteAddr()
	d := net.Dialer{Timeout: route.ConnectTimeout}
	ctx, cancel := context.WithTimeout(context.Background(), route.ConnectTimeout)
	up, err := d.DialContext(ctx, "tcp", route.Upstream)
	cancel()
	if err == nil && route.ProxyProtocol != 0 {
		err = writeProxyHeader(up, link, route.ProxyProtocol)
		if err != nil {
			up.Close()
		}
	}
	if err != nil {
		reason := fmt.Sprintf("upstream %s: %v", route.Upstream, err)
		log.Warn("upstream connect failed", "upstream", route.Upstream, "link", link, "err", err)
		g.metrics.DialFailed("gateway", route.Name)
		g.metrics.SessionEnded("gateway", route.Name, "upstream")
		conn.Reset(frame.CodeUpstream, reason)
		return
	}
	tcp := up.(*net.TCPConn)
	tcp.SetNoDelay(true)
	log.Info("session start", "link", link, "upstream", route.Upstream, "upstream_local", tcp.LocalAddr())
	g.splice(tcp, &tracked{conn: conn, route: route.Name, app: route.Upstream, started: start}, log)
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
	g.abortCancel()
	g.srv.Close()
	g.accept.Wait()
	g.sessions.Wait()
}

// ErrNoSession is returned by GoAway for an id that is not live here.
var ErrNoSession = errors.New("no such session on this gateway")

// GoAway asks the client of session id (as /sessions lists it) to move the
// session to a new link while the current one keeps working
// (docs/protocol.md section 5.6, make-before-break migration). The session
// continues without a gap.
func (g *Gateway) GoAway(id, reason string) error {
	conn := g.tracker.find(id)
	if conn == nil {
		return fmt.Errorf("%w: %s", ErrNoSession, id)
	}
	return conn.GoAway(reason)
}
