package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/acceptloop"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	Logger  *slog.Logger // nil: discard
	Metrics Metrics      // nil: NopMetrics
}

// Client is the sidecar next to unmodified applications. It owns the
// application listeners given to Serve and their routes' dialers.
type Client struct {
	core
	certLog certLog       // certificate failures, logged per listener
	stop    chan struct{} // closed by Shutdown or Close: ends accept backoffs
	accepts sync.WaitGroup

	mu        sync.Mutex
	listeners map[net.Listener]*acceptloop.State // live ones; a dead one stays to report its error
	dialers   []transport.Dialer
	draining  bool
	closed    bool
	stopOnce  sync.Once
}

// NewClient returns a Client; call Serve for each local listener.
func NewClient(cfg ClientConfig) *Client {
	c := &Client{
		listeners: map[net.Listener]*acceptloop.State{},
		stop:      make(chan struct{}),
	}
	c.init("client", "bytes_to_gateway", "bytes_from_gateway", cfg.Logger, cfg.Metrics)
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
	cfg := r.session()
	c.mu.Lock()
	if c.closed || c.draining {
		c.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	st := &acceptloop.State{Log: c.log.With("side", "client"), Name: ln.Addr().String()}
	c.listeners[ln] = st
	c.dialers = append(c.dialers, r.Dialer)
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
		c.goSession(func() { c.handle(app, r, cfg) })
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

func (c *Client) handle(app *net.TCPConn, r ClientRoute, cfg *resume.Config) {
	app.SetNoDelay(true)
	start := time.Now()
	appAddr := app.RemoteAddr().String()
	sess, err := c.open(app, r, cfg)
	if err != nil {
		c.log.Warn("session open failed", "side", "client", "route", r.Route, "gateway", r.Gateway, "app", appAddr, "err", err)
		c.metrics.DialFailed("client", r.Route)
		resetTCP(app)
		return
	}
	log := c.log.With("side", "client", "session", sess.SessionID().String(), "route", r.Route)
	log.Info("session start", "app", appAddr, "gateway", r.Gateway, "link", sess.RemoteAddr(),
		"reconnect_timeout", sess.ReconnectTimeout())
	c.splice(app, &tracked{conn: sess, route: r.Route, app: appAddr, started: start}, log)
}

// open opens the session for a new application connection. Link failures
// are retried with the route's strategy for up to the reconnect timeout,
// as a link failure of a live session would be: the application's connect
// has already succeeded and it waits as it would during an outage. A
// refusal by the gateway (unknown route, limits, draining), a gateway
// certificate that fails verification and a gateway that does not speak
// TLS fail at once.
func (c *Client) open(app *net.TCPConn, r ClientRoute, cfg *resume.Config) (*resume.Conn, error) {
	ctx, cancel := context.WithCancel(c.abort) // Close cancels it
	defer cancel()
	deadline := time.Now().Add(cfg.ReconnectTimeout)
	for attempt := 0; ; attempt++ {
		sess, err := resume.Dial(ctx, c.linkDial(r), r.Route, cfg)
		if err == nil {
			return sess, nil
		}
		var re *resume.Error
		if errors.As(err, &re) && re.Remote && !re.Code.Retryable() || ctx.Err() != nil {
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
		if time.Now().Add(d).After(deadline) {
			return nil, err
		}
		c.log.Debug("session open attempt failed", "side", "client", "route", r.Route, "attempt", attempt, "err", err)
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
	c.mu.Unlock()
	c.abortCancel()
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
