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

// Route maps a route name to an upstream service on a gateway.
type Route struct {
	Name     string
	Upstream string // host:port
	// ConnectTimeout bounds the upstream dial (0: DefaultConnectTimeout).
	ConnectTimeout time.Duration
	// ProxyProtocol, if 1 or 2, sends a PROXY protocol header of that
	// version to the upstream first, naming the client sidecar's address
	// (as seen on the link) as the source.
	ProxyProtocol int
	// Session, if set, holds this route's session settings (reconnect
	// timeout cap, buffers, liveness); nil: the gateway's.
	Session *resume.Config
}

// DefaultConnectTimeout bounds an upstream dial.
const DefaultConnectTimeout = 5 * time.Second

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
	routes  map[string]Route
	srv     *resume.Server
	log     *slog.Logger
	metrics Metrics
	tracker *Tracker

	mu          sync.Mutex
	listeners   []net.Listener
	draining    bool
	abort       context.Context // cancelled to force-close splices
	abortCancel context.CancelFunc
	wg          sync.WaitGroup // accept loop and splices
}

// NewGateway validates cfg and returns a Gateway; call Serve with one or
// more link listeners.
func NewGateway(cfg GatewayConfig) (*Gateway, error) {
	if len(cfg.Routes) == 0 {
		return nil, errors.New("gateway: no routes")
	}
	g := &Gateway{
		routes:  map[string]Route{},
		log:     cfg.Logger,
		metrics: cfg.Metrics,
		tracker: newTracker(),
	}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	if g.metrics == nil {
		g.metrics = NopMetrics{}
	}
	for _, r := range cfg.Routes {
		if err := ValidateRouteName(r.Name); err != nil {
			return nil, err
		}
		if _, dup := g.routes[r.Name]; dup {
			return nil, fmt.Errorf("gateway: route %q defined twice", r.Name)
		}
		if err := ValidateHostPort(r.Upstream); err != nil {
			return nil, fmt.Errorf("route %q upstream: %w", r.Name, err)
		}
		if r.ProxyProtocol != 0 && r.ProxyProtocol != 1 && r.ProxyProtocol != 2 {
			return nil, fmt.Errorf("route %q: proxy protocol version %d (want 1 or 2)", r.Name, r.ProxyProtocol)
		}
		if r.ConnectTimeout <= 0 {
			r.ConnectTimeout = DefaultConnectTimeout
		}
		if r.Session != nil {
			if err := r.Session.Validate(); err != nil {
				return nil, fmt.Errorf("route %q: %w", r.Name, err)
			}
		}
		g.routes[r.Name] = r
	}
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
		return nil, err
	}
	g.srv = srv
	g.tracker.failures = srv.ResumeFailures
	g.tracker.unconfirmed = srv.Unconfirmed
	g.abort, g.abortCancel = context.WithCancel(context.Background())
	g.metrics.Track("gateway", g.tracker)
	g.wg.Add(1)
	go g.acceptLoop()
	return g, nil
}

// ValidateRouteName checks a route name: 1 to 255 bytes.
func ValidateRouteName(name string) error {
	if name == "" {
		return errors.New("route name is empty")
	}
	if len(name) > frame.MaxRoute {
		return fmt.Errorf("route name %.20q... is longer than %d bytes", name, frame.MaxRoute)
	}
	return nil
}

// ValidateHostPort checks that addr is host:port with a numeric port.
func ValidateHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: want host:port", addr)
	}
	if _, err := net.LookupPort("tcp", port); err != nil || port == "" {
		return fmt.Errorf("address %q: bad port", addr)
	}
	return nil
}

// Server is the underlying session server.
func (g *Gateway) Server() *resume.Server { return g.srv }

// AcceptErr is non-nil while accepting links fails (descriptor
// exhaustion, retried with a backoff) or a link listener has failed for
// good; /healthz reports it.
func (g *Gateway) AcceptErr() error { return g.srv.AcceptErr() }

// Tracker is the set of live sessions.
func (g *Gateway) Tracker() *Tracker { return g.tracker }

// Sessions lists live sessions for the status endpoint.
func (g *Gateway) Sessions() []SessionInfo { return g.tracker.Sessions("gateway") }

// Serve feeds links from l into the gateway until l or the gateway is
// closed. The gateway closes l when it closes. Accept failures that can
// pass (descriptor exhaustion) are retried with a backoff and reported by
// AcceptErr; Serve returns nil once the gateway is closed, or the error
// that broke l for good.
func (g *Gateway) Serve(l net.Listener) error {
	g.mu.Lock()
	g.listeners = append(g.listeners, l)
	g.mu.Unlock()
	err := g.srv.Serve(l)
	if errors.Is(err, resume.ErrServerClosed) {
		return nil
	}
	return err
}

func (g *Gateway) acceptLoop() {
	defer g.wg.Done()
	for {
		conn, err := g.srv.Accept()
		if err != nil {
			return
		}
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			g.handle(conn)
		}()
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
	x := &tracked{conn: conn, route: route.Name, app: route.Upstream, started: start}
	// Up is what the upstream sent into the session, Down what it got.
	runSplice("gateway", tcp, conn, x, g.abort, g.tracker, g.metrics, log, "bytes_from_upstream", "bytes_to_upstream")
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

// Close aborts every session and stops the gateway.
func (g *Gateway) Close() error {
	g.forceClose()
	return nil
}

func (g *Gateway) forceClose() {
	g.abortCancel()
	g.srv.Close()
	g.mu.Lock()
	for _, l := range g.listeners {
		l.Close()
	}
	g.mu.Unlock()
	g.wg.Wait()
}

// ErrNoSession is returned by GoAway for an id that is not live here.
var ErrNoSession = errors.New("no such session on this gateway")

// GoAway asks the client of session id (as /sessions lists it) to move the
// session to a new link while the current one keeps working: the seeds'
// operator-initiated reconnection. The session continues without a gap.
func (g *Gateway) GoAway(id, reason string) error {
	conn := g.tracker.find(id)
	if conn == nil {
		return fmt.Errorf("%w: %s", ErrNoSession, id)
	}
	return conn.GoAway(reason)
}
