package proxy

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// Routes: what a gateway maps route names to, what a client's listeners
// dial, and every check on them, in one place.

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

// Validate reports the first thing wrong with r.
func (r Route) Validate() error {
	if err := ValidateRouteName(r.Name); err != nil {
		return err
	}
	if err := ValidateHostPort(r.Upstream); err != nil {
		return fmt.Errorf("route %q upstream: %w", r.Name, err)
	}
	if r.ProxyProtocol != 0 && r.ProxyProtocol != 1 && r.ProxyProtocol != 2 {
		return fmt.Errorf("route %q: proxy protocol version %d (want 1 or 2)", r.Name, r.ProxyProtocol)
	}
	if r.Session != nil {
		if err := r.Session.Validate(); err != nil {
			return fmt.Errorf("route %q: %w", r.Name, err)
		}
	}
	return nil
}

// routeTable validates a gateway's routes and returns them by name, with
// defaults filled in.
func routeTable(routes []Route) (map[string]Route, error) {
	if len(routes) == 0 {
		return nil, errors.New("gateway: no routes")
	}
	table := make(map[string]Route, len(routes))
	for _, r := range routes {
		if err := r.Validate(); err != nil {
			return nil, err
		}
		if _, dup := table[r.Name]; dup {
			return nil, fmt.Errorf("gateway: route %q defined twice", r.Name)
		}
		if r.ConnectTimeout <= 0 {
			r.ConnectTimeout = DefaultConnectTimeout
		}
		table[r.Name] = r
	}
	return table, nil
}

// ClientRoute is one local listener of a client sidecar: applications that
// connect to it get a session on Route at the gateway reached by Dialer.
type ClientRoute struct {
	Route   string
	Dialer  transport.Dialer
	Session *resume.Config // nil: resume.DefaultConfig()
	// Gateway names the gateway in logs.
	Gateway string
	// NewDialer, if set, makes a dialer to another address of the same
	// gateway, with Dialer's transport and TLS settings (the gateway's
	// certificate is checked against the name Dialer checks). A session
	// whose gateway sends GOAWAY naming an address dials it through such a
	// dialer from then on. nil: such a GOAWAY moves the session to a new
	// link to Dialer's address.
	NewDialer func(addr string) (transport.Dialer, error)
	// SendAppAddr: each session states its application's address in
	// HELLO, for a gateway that passes it on to the upstream. Gateways
	// of builds before it refuse such a HELLO.
	SendAppAddr bool
}

// Validate reports the first thing wrong with r.
func (r ClientRoute) Validate() error {
	if err := r.session().Validate(); err != nil {
		return err
	}
	if r.Dialer == nil {
		return fmt.Errorf("route %q: no dialer", r.Route)
	}
	return ValidateRouteName(r.Route)
}

// session is r's session config, the default if none is set.
func (r ClientRoute) session() *resume.Config {
	if r.Session == nil {
		return resume.DefaultConfig()
	}
	return r.Session
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
