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

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/internal/acceptloop"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	Logger  *slog.Logger // nil: discard
	Metrics Metrics      // nil: NopMetrics
	// MaxRedials caps the reconnect attempts (dial and handshake) of all
	// the client's sessions in flight at once, so that a gateway's
	// outage does not end in every session dialing it in the same
	// instant (resume.RedialGate). 0: resume.DefaultRedialGateLimit;
	// negative: no cap. A route's session settings with Redials set
	// keep theirs.
	MaxRedials int
}

// Client is the sidecar next to unmodified applications. It owns the
// application listeners given to Serve and their routes' dialers.
type Client struct {
	core
	certLog certLog            // certificate failures, logged per listener
	stop    chan struct{}      // closed by Shutdown or Close: ends accept backoffs
	redials *resume.RedialGate // nil: no cap
	accepts sync.WaitGroup
	opening atomic.Int64 // sessions in open: CONNECTING

	mu        sync.Mutex
	listeners map[net.Listener]*acceptloop.State // live ones; a dead one stays to report its error
	dialers   []transport.Dialer
	// moved are the dialers to other addresses of a route's gateway that
	// a GOAWAY sent sessions to, by route dialer and address.
	moved map[movedKey]transport.Dialer
	// served holds each listener's route and session settings by its
	// address, for Reload.
	served   map[string]*atomic.Pointer[servedRoute]
	draining bool
	closed   bool
	stopOnce sync.Once
}

// NewClient returns a Client; call Serve for each local listener.
func NewClient(cfg ClientConfig) *Client {
	c := &Client{
		listeners: map[net.Listener]*acceptloop.State{},
		moved:     map[movedKey]transport.Dialer{},
		served:    map[string]*atomic.Pointer[servedRoute]{},
		stop:      make(chan struct{}),
	}
	switch {
	case cfg.MaxRedials == 0:
		c.redials = resume.NewRedialGate(resume.DefaultRedialGateLimit)
	case cfg.MaxRedials > 0:
		c.redials = resume.NewRedialGate(cfg.MaxRedials)
	}
	c.init("client", "bytes_to_gateway", "bytes_from_gateway", cfg.Logger, cfg.Metrics)
	c.tracker.opening = func() int { return int(c.opening.Load()) }
	c.metrics.Track("client", c.tracker)
	return c
}

// Serve accepts application connections on ln until ln or the client is
// closed; each becomes a session on r. The client closes ln and r.Dialer
// when it shuts down.
func (c *Client) Serve(ln net.Listener, r ClientRoute) error {
	if err := r.Validate(); err != nil {
		ln.Close()
		return err
	}
	c.mu.Lock()
	if c.closed || c.draining {
		c.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	st := &acceptloop.State{Log: c.log.With("side", "client"), Name: ln.Addr().String()}
	c.listeners[ln] = st
	c.dialers = append(c.dialers, r.Dialer)
	cur := c.serve(ln.Addr().String(), r)
	c.accepts.Add(1)
	c.mu.Unlock()
	defer c.accepts.Done()
	for {
		a, err := acceptloop.Accept(ln, st, c.stop)
		if err != nil {
			c.mu.Lock()
			stopping := c.closed || c.draining
			if stopping || errors.Is(err, net.ErrClosed) {
				delete(c.listeners, ln)
			}
			c.mu.Unlock()
			if stopping || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// The listener is broken for good; its State keeps reporting
			// it (AcceptErr) and the caller decides what to do.
			return err
		}
		app, ok := a.(*net.TCPConn)
		if !ok {
			a.Close()
			continue
		}
		// The settings as they are now: a reload changes those of
		// sessions that open later, never this one's.
		sr := cur.Load()
		c.handling.Add(1) // before the accept loop can pause: see FreezeForHandover
		c.goSession(func() { c.handle(app, sr.r, sr.cfg, st.Name) })
	}
}

// AcceptErr is non-nil while accepting application connections fails on
// any listener (descriptor exhaustion, retried with a backoff) or a
// listener has failed for good; /healthz reports it.
func (c *Client) AcceptErr() error {
	c.mu.Lock()
	states := make([]*acceptloop.State, 0, len(c.listeners))
	for _, st := range c.listeners {
		states = append(states, st)
	}
	c.mu.Unlock()
	var errs []error
	for _, st := range states {
		if err := st.Err(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (c *Client) handle(app *net.TCPConn, r ClientRoute, cfg *resume.Config, listen string) {
	app.SetNoDelay(true)
	start := time.Now()
	appAddr := app.RemoteAddr().String()
	sess, err := c.open(app, r, cfg, c.linkDial(r))
	if err != nil {
		c.handling.Add(-1)
		c.log.Warn("session open failed", "side", "client", "route", r.Route, "gateway", r.Gateway, "app", appAddr, "err", err)
		c.metrics.DialFailed("client", r.Route)
		resetTCP(app)
		return
	}
	log := c.log.With("side", "client", "session", sess.SessionID().String(), "route", r.Route)
	x := c.track(sess, r.Route, appAddr, start)
	x.listen = listen
	c.handling.Add(-1)
	log.Info("session start", "app", appAddr, "gateway", r.Gateway, "link", sess.RemoteAddr(),
		"reconnect_timeout", sess.ReconnectTimeout())
	c.splice(app, x, log)
}

// open opens the session for a new application connection. Link failures
// are retried with the route's strategy for up to the reconnect timeout,
// as a link failure of a live session would be: the application's connect
// has already succeeded and it waits as it would during an outage. A
// refusal by the gateway (unknown route, limits), a gateway
// certificate that fails verification and a gateway that does not speak
// TLS fail at once.
//
// A gateway that refuses with THROTTLED and a retry delay is not asked
// again before that delay. One that is draining (SHUTTING_DOWN) is
// redialed as after a link failure.
func (c *Client) open(app *net.TCPConn, r ClientRoute, cfg *resume.Config, dial resume.DialFunc) (*resume.Conn, error) {
	ctx, cancel := context.WithCancel(c.abort) // Close cancels it
	defer cancel()
	c.opening.Add(1)
	defer c.opening.Add(-1)
	deadline := time.Now().Add(cfg.ReconnectTimeout)
	for attempt := 0; ; attempt++ {
		sess, err := resume.DialWith(ctx, dial, r.Route, dialOptions(app, r), cfg)
		if err == nil {
			return sess, nil
		}
		var re *resume.Error
		remote := errors.As(err, &re) && re.Remote
		// SHUTTING_DOWN is tried again too: behind a load balancer the
		// next dial may land on a gateway that is not draining (one
		// that is stops getting new connections once its /readyz
		// fails), and a lone gateway's successor comes up on its
		// address within the drain.
		draining := remote && re.Code == frame.CodeShuttingDown
		if remote && !re.Code.Retryable() && !draining || ctx.Err() != nil {
			// A final refusal (unknown route, LIMIT, ...). THROTTLED and
			// the other retryable codes are tried again below, within
			// the reconnect timeout: a gateway shedding a burst of
			// HELLOs should delay the application, not reset it.
			return nil, err
		}
		if _, bad := transport.CertVerifyFailure(err); bad || transport.NotTLS(err) {
			// The gateway's certificate will not verify on the next
			// attempt either (nor will a gateway that does not speak
			// TLS start to): the application gets its reset now.
			return nil, err
		}
		d := max(cfg.Strategy.Delay(attempt+1), 10*time.Millisecond)
		if remote && re.Code == frame.CodeThrottled {
			d = max(d, re.RetryAfter)
		}
		if time.Now().Add(d).After(deadline) {
			return nil, err
		}
		if appGone(app) {
			// The application gave up (closed or reset without sending
			// anything): retrying for it would only hold its descriptor,
			// which, when descriptors ran out, is what every new session
			// waits for.
			return nil, fmt.Errorf("%w (the application closed its connection meanwhile)", err)
		}
		c.log.Debug("session open attempt failed", "side", "client", "route", r.Route, "attempt", attempt, "err", err, "retry_in", d)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, err
		}
	}
}

// Shutdown drains: the listeners close at once (no new application
// connections), live sessions go on until they end or ctx is done, then
// the rest are aborted (applications see a reset).
func (c *Client) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	c.draining = true
	c.stopOnce.Do(func() { close(c.stop) })
	for ln := range c.listeners {
		ln.Close()
	}
	c.mu.Unlock()
	c.accepts.Wait()
	done := make(chan struct{})
	go func() { c.sessions.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	c.Close()
	return err
}

// Close aborts every session and stops the client.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.stopOnce.Do(func() { close(c.stop) })
	for ln := range c.listeners {
		ln.Close()
	}
	dialers := c.dialers
	c.dialers = nil
	for k, d := range c.moved {
		dialers = append(dialers, d)
		delete(c.moved, k)
	}
	c.mu.Unlock()
	c.abortCancel(shutdownEnd)
	c.accepts.Wait()
	c.sessions.Wait()
	for _, d := range dialers {
		d.Close()
	}
	return nil
}

// Draining reports whether Shutdown has begun.
func (c *Client) Draining() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.draining || c.closed
}

// Sessions lists the live sessions, oldest first.
func (c *Client) Sessions() []SessionInfo { return c.tracker.Sessions(c.side) }

// Session returns the live session id (as Sessions lists it).
func (c *Client) Session(id string) (SessionInfo, error) {
	x := c.tracker.find(id)
	if x == nil {
		return SessionInfo{}, fmt.Errorf("%w: %s", ErrNoSession, id)
	}
	return c.tracker.info(c.side, x.conn, x, time.Now()), nil
}

// End ends session id now: the application gets a reset, and the gateway
// a RESET that resets the upstream connection (through a new link if the
// session is parked). It returns the session as it was ended.
func (c *Client) End(id, reason string) (SessionInfo, error) { return c.end(id, reason) }

type movedKey struct {
	d    transport.Dialer // the route's own dialer
	addr string
}

// dialAddr is what a route's sessions dial another address of their
// gateway with, when a GOAWAY names one: a dialer made by r.NewDialer
// for that address, kept for every session the route moves there and
// closed with the client.
func (c *Client) dialAddr(r ClientRoute) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		key := movedKey{r.Dialer, addr}
		c.mu.Lock()
		d := c.moved[key]
		if d == nil && !c.closed {
			nd, err := r.NewDialer(addr)
			if err != nil {
				c.mu.Unlock()
				return nil, fmt.Errorf("dialer for %s: %w", addr, err)
			}
			d = nd
			c.moved[key] = d
		}
		c.mu.Unlock()
		if d == nil {
			return nil, net.ErrClosed
		}
		conn, err := d.Dial(ctx)
		if err != nil {
			c.certLog.report(c.log, ClientRoute{Route: r.Route, Dialer: d, Gateway: addr}, err)
		}
		return conn, err
	}
}
