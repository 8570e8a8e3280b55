package proxy

import (
	"fmt"
	"sync/atomic"

	"github.com/lifeline-proxy/lifeline/resume"
)

// Reloading settings at runtime (SIGHUP in cmd/lifeline). A session reads
// its route, upstream and session settings once, when it opens, and keeps
// them: a reload changes what later sessions get, never a live session's.
// Listeners and transports and TLS files are fixed for the life of a
// Gateway or Client; the gateway's limits change with SetLimits.

// Reload replaces the gateway's route table. New sessions (HELLOs from
// now on, and sessions admitted but not yet connected to their upstream)
// use routes; live sessions keep the upstream, PROXY header setting and
// session settings they opened with, and resume as before. A route
// removed here refuses new sessions with NOT_FOUND. A route whose Session
// is nil gets the gateway's session settings of NewGateway
// (GatewayConfig.Server.Session). routes is checked as NewGateway checks
// it; on an error the table in use is kept.
func (g *Gateway) Reload(routes []Route) error {
	table, err := routeTable(routes)
	if err != nil {
		return err
	}
	g.setRoutes(table)
	return nil
}

// Limits are the gateway's admission and resource limits in force.
func (g *Gateway) Limits() resume.Limits { return g.srv.Limits() }

// SetLimits changes the gateway's limits (max sessions, memory budget,
// per-source caps, the failed-resume throttle) for what comes next: live
// sessions are never ended for a lower limit. An invalid set is refused
// and the old one kept.
func (g *Gateway) SetLimits(l resume.Limits) error { return g.srv.SetLimits(l) }

// setRoutes installs table, its session settings made to report to the
// metrics.
func (g *Gateway) setRoutes(table map[string]Route) {
	for name, r := range table {
		if r.Session != nil {
			r.Session = g.withHooks(r.Session)
			table[name] = r
		}
	}
	g.routes.Store(&table)
}

// route is the route named name in the current table.
func (g *Gateway) route(name string) (Route, bool) {
	r, ok := (*g.routes.Load())[name]
	return r, ok
}

// Routes returns the current route table by name (a copy).
func (g *Gateway) Routes() map[string]Route {
	t := *g.routes.Load()
	out := make(map[string]Route, len(t))
	for k, v := range t {
		out[k] = v
	}
	return out
}

// upstreamOf is the upstream route name maps to now ("" if none).
func (g *Gateway) upstreamOf(name string) string {
	r, _ := g.route(name)
	return r.Upstream
}

// servedRoute is what a client listener gives the sessions it opens.
type servedRoute struct {
	r   ClientRoute
	cfg *resume.Config // r's session settings, with the metrics hooks
}

// serve registers the listener at addr with route r and returns the
// pointer its accept loop reads; c.mu is held.
func (c *Client) serve(addr string, r ClientRoute) *atomic.Pointer[servedRoute] {
	p := &atomic.Pointer[servedRoute]{}
	p.Store(c.servedFor(r))
	c.served[addr] = p
	return p
}

// servedFor is r with its session settings ready for sessions.
func (c *Client) servedFor(r ClientRoute) *servedRoute {
	cfg := c.withHooks(r.session())
	if cfg.Redials == nil {
		cfg.Redials = c.redials
	}
	if r.NewDialer != nil {
		cfg.DialAddr = c.dialAddr(r)
	}
	return &servedRoute{r: r, cfg: cfg}
}

// Reload changes the route name and session settings (nil:
// resume.DefaultConfig()) of the listener at addr (its Addr().String(),
// as Serve was given it) for the application connections it accepts from
// now on. Live sessions keep theirs. The gateway address, transport and
// TLS settings (the listener's Dialer) stay: changing them needs a new
// process.
func (c *Client) Reload(addr, route string, sess *resume.Config) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.served[addr]
	if p == nil {
		return fmt.Errorf("no client listener on %s", addr)
	}
	r := p.Load().r
	r.Route, r.Session = route, sess
	if err := r.Validate(); err != nil {
		return fmt.Errorf("listener %s: %w", addr, err)
	}
	p.Store(c.servedFor(r))
	return nil
}
